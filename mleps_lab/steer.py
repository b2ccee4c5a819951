"""The steering benchmark: does a rule's task loss move what cross-entropy cannot see?

    python scripts/bench_steer.py --base RUN/checkpoints/best --out /work/runs/steer/bench

A positive control. From one MLE base, every arm fine-tunes for the same number of steps on a *control*
task loss that token cross-entropy is blind to (or pulls against), and the control loss and a guard
(BLEU) are read on validation during training and on test at the end:

    length         mean over outputs of |words/reference words - 0.7|   (sentence level)
    banned         share of outputs containing the word "a"             (sentence level)
    corpus_length  |Σ words / Σ reference words - 0.7| over the batch   (corpus level: PG and GRPO can only
                   reward each output's own |ratio - 0.7|; MGS scores the batch's pooled lengths)

Arms: continued MLE, PG, GRPO, MRT, MGS as shipped (trainer=mgs) and its blind twin (the same samples,
trainer.weighting=uniform), MGS with the task-aware guide (trainer=mgs_steer) and its blind twin.
The steering ratio of an arm is (MGS-blind's loss - the arm's) / (MGS-blind's loss - the best arm's),
on validation at equal time (each arm's last evaluation within PG's training seconds, same seed).

Every run is a real `python -m mleps.train` / `python -m mleps.evaluate`; each finished run leaves
result.json in its folder, so a cut-off benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sacrebleu

from mleps.losses import build_task_loss
from mleps_lab.runs import ROOT, shown, write_json_atomic


@dataclass(frozen=True)
class Control:
    overrides: tuple[str, ...]  # metric= options: the task loss every rule minimises and validation reports
    loss: tuple[str, str, dict]  # (name, level, options) of the same loss, for the test split's statistics


CONTROLS = {
    "length": Control(("metric=length", "metric.level=sentence", "metric.target=0.7"),
                      ("length", "sentence", {"target": 0.7})),
    "banned": Control(("metric=banned", "metric.level=sentence", "metric.word=a"),
                      ("banned", "sentence", {"word": "a"})),
    "corpus_length": Control(("metric=length", "metric.level=corpus", "metric.target=0.7"),
                             ("length", "corpus", {"target": 0.7})),
}

ARMS = {  # in the order they run: the arms the bar compares first
    "mgs_steer": ("trainer=mgs_steer",),
    "mgs_steer_blind": ("trainer=mgs_steer", "trainer.weighting=uniform"),
    "mgs_blind": ("trainer=mgs", "trainer.warm_start_steps=0", "trainer.weighting=uniform"),
    "pg": ("trainer=pg",),
    "mle": ("trainer=mle", "trainer.lr=1e-4", "trainer.schedule=constant", "trainer.warmup_steps=0"),
    "grpo": ("trainer=grpo",),
    "mgs": ("trainer=mgs", "trainer.warm_start_steps=0"),
    "mrt": ("trainer=mrt",),
    # a lever screened after the preset was fixed: the guide leaves out rows whose greedy output is already best
    "mgs_steer_improved": ("trainer=mgs_steer", "trainer.guide_rows=improved"),
}
BLIND_OF = {"mgs": "mgs_blind", "mgs_steer": "mgs_steer_blind"}
REFERENCE_BLIND = "mgs_blind"  # the steering ratio's zero: the shipped rule with its weights switched off


@dataclass(frozen=True)
class Budget:
    steps: int
    eval_every: int
    common: tuple[str, ...]
    test: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    controls: tuple[str, ...] = tuple(CONTROLS)


TRAIN_DECODE = ("trainer.max_new_tokens=32", "decode.max_new_tokens=32")
BUDGETS = {
    # a shared 2-core CPU: 12 steps of 32 sentences, validation on 100 sentences every 4 steps, test on 500
    "cpu": Budget(steps=12, eval_every=4,
                  common=("trainer.batch_size=32", "data.max_eval_examples=100", "eval.metrics=[bleu]",
                          "progress=false", *TRAIN_DECODE),
                  test=("split=test", "decode.max_new_tokens=32", "data.max_eval_examples=500")),
    # the tests' size: the pipeline only
    "tiny": Budget(steps=2, eval_every=1, seeds=(0,), arms=("mle", "mgs", "mgs_blind", "mgs_steer"),
                   controls=("length", "corpus_length"),
                   common=("trainer.batch_size=8", "data.max_train_examples=32", "data.max_eval_examples=8",
                           "eval.metrics=[bleu]", "progress=false", "cpu=true", "trainer.max_new_tokens=8",
                           "decode.max_new_tokens=8", "trainer.guide_samples=2"),
                   test=("split=test", "decode.max_new_tokens=8", "data.max_eval_examples=8")),
}


def python_m(*argv: str, log: Path) -> tuple[list[str], str]:
    """Run `python -m argv` from the repo root, its stderr appended to `log`; (argv, its stdout)."""
    cmd = [sys.executable, "-m", *argv]
    with log.open("a") as err:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        raise SystemExit(f"error: {shown(cmd[1:])} failed (exit {done.returncode}); its output is in {log}")
    return cmd[2:], done.stdout


def arm_overrides(arm: str, budget: Budget) -> list[str]:
    """An arm's own options, then the budget's, less those its rule does not have (MLE decodes only to
    validate; guide_samples is MGS-steer's)."""
    def has(option: str) -> bool:
        if option.startswith("trainer.max_new_tokens"):
            return arm != "mle"
        if option.startswith("trainer.guide_samples"):
            return arm.startswith("mgs_steer")
        return True
    return [*ARMS[arm], *(o for o in budget.common if has(o))]


def run_arm(out: Path, base: Path, control: str, arm: str, seed: int, budget: Budget) -> dict:
    """Train one arm, evaluate its last checkpoint on test; the numbers land in result.json."""
    run = out / control / arm / f"seed{seed}"
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    log = run.parent / f"seed{seed}.log"
    train, _ = python_m("mleps.train", *arm_overrides(arm, budget), *CONTROLS[control].overrides,
                     f"init_from={base}", f"seed={seed}", f"trainer.max_steps={budget.steps}",
                     f"trainer.eval_every={budget.eval_every}", f"trainer.save_every={budget.steps}",
                     f"output_dir={run}", "overwrite=true", log=log)
    predictions = run / "test-predictions.txt"
    evaluate, printed = python_m("mleps.evaluate", f"checkpoint={run / 'checkpoints' / 'last'}", *budget.test,
                                 "eval.metrics=[bleu]", f"predictions={predictions}", log=log)
    result = summarise_run(run, control, predictions)
    result["test"] = json.loads(printed.strip().splitlines()[-1])  # evaluate's one JSON line
    result.update(control=control, arm=arm, seed=seed, commands=[shown(train), shown(evaluate)])
    write_json_atomic(done, result)
    return result


def summarise_run(run: Path, control: str, predictions: Path) -> dict:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [e for e in events if e.get("split") == "train"]
    # validation rows carry the training seconds so far (evaluation excluded)
    curve = [{"step": e["step"], "train_s": e["train_s"], "loss": e["loss"], "bleu": e.get("bleu")}
             for e in events if e.get("split") == "validation" and e.get("phase", "main") == "main"]
    diagnostics = {k: float(np.mean([e[k] for e in train if k in e])) for k in
                   ("ess_share", "loss_spread_std", "guided_weight", "update_norm", "guide_rows_swapped")
                   if any(k in e for e in train)}
    hyps = predictions.read_text().splitlines()
    test_file = Path(os.environ.get("MLEPS_DATA_DIR", ROOT / "data")) / "multi30k" / "test.jsonl"
    refs = [json.loads(line)["en"] for line in test_file.read_text().splitlines()]
    rows = row_stats(control, hyps, refs[:len(hyps)])
    name, level, options = CONTROLS[control].loss
    loss = build_task_loss(name, level, **options)
    corpus = row_stats(control, hyps, refs[:len(hyps)], level="corpus")
    bleu = sacrebleu.corpus_bleu(hyps, [refs[:len(hyps)]])  # the guard; without its brevity penalty too, since a
    # length target of 0.7 costs BLEU exp(1 - 1/0.7) = 0.65x through the penalty alone
    return {"curve": curve, "train_s": curve[-1]["train_s"], "diagnostics": diagnostics,
            "test_loss": loss.loss_from_stats(rows.sum(0)), "test_rows": rows.tolist(),
            "test_loss_corpus": loss.at_level("corpus").loss_from_stats(corpus.sum(0)),
            "test_bleu": bleu.score, "test_bp": bleu.bp, "test_bleu_no_bp": bleu.score / bleu.bp if bleu.bp else 0.0}


def row_stats(control: str, hyps: list[str], refs: list[str], level: str | None = None) -> np.ndarray:
    """(N, S) the control loss's additive statistics of each test output (at the level it trains at, or
    `level`: validation reports every loss's corpus form)."""
    from mleps.decoding import DecodedBatch
    from mleps.trainers.mgs import per_row_stats

    name, trained_level, options = CONTROLS[control].loss
    decoded = DecodedBatch(texts=hyps, token_ids=[[]] * len(hyps), ended_with_eos=[True] * len(hyps),
                           references=[[r] for r in refs])
    return per_row_stats(build_task_loss(name, level or trained_level, **options), decoded)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the MLE checkpoint every arm starts from")
    p.add_argument("--out", type=Path, required=True, help="run folders; rerun to resume")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--controls", nargs="+", choices=list(CONTROLS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--report", type=Path, help="write the report here (e.g. docs/results/steer)")
    args = p.parse_args(argv)
    budget = BUDGETS[args.budget]
    if not (args.base / "config.json").exists() and not (args.base / "adapter_config.json").exists():
        raise SystemExit(f"error: --base {args.base} is not a checkpoint folder (no config.json): pass a run's "
                         f"checkpoints/best")
    controls, arms, seeds = args.controls or budget.controls, args.arms or budget.arms, args.seeds or budget.seeds
    results = []
    for seed in seeds:  # seed-major: a cut-off run still has every arm of the first seeds
        for control in controls:
            for arm in arms:
                t0 = time.perf_counter()
                results.append(run_arm(args.out, args.base.resolve(), control, arm, seed, budget))
                print(f"steer: {control} {arm} seed {seed}: test loss {results[-1]['test_loss']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.report:
        from mleps_lab.steer_report import write_report
        command = "python scripts/bench_steer.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_report(results, args.report, command, budget)

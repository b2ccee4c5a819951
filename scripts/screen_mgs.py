"""Screen MGS levers from one checkpoint: one short run per lever, one table.

    python scripts/screen_mgs.py --init RUN/checkpoints/best --steps 40 --out runs/screen \
        --levers target_ess,rank,antithetic,line_search [--seeds 0,1] [-- extra.overrides=...]

Each lever (LEVERS below) runs `python -m mleps.train trainer=mgs trainer.warm_start_steps=0
init_from=INIT` for --steps MGS steps, one run after another, with the same fixed validation
subset (the first --eval-examples validation sentences, data.max_eval_examples) evaluated at
the start, every --eval-every steps and at the end, and the weights' diagnostic
(trainer.diagnose_every=--diagnose-every on the first --diagnose-examples of those sentences).
`default` (the plain rule) and `blind` (trainer.weighting=uniform: uniform weights) always run.
Anything after `--` is passed to every run (e.g. trainer.batch_size=32).

Writes DIR/<lever>-seed<S>/ (each run), DIR/screen.json and DIR/screen.md, and prints the
table: the mleps_lab/mgs_summary.py columns averaged over seeds, plus Δ vs blind (final and best
score minus blind's, same seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mleps_lab.mgs_summary import COLUMNS, markdown_table, summarise
from mleps.rundir import read_events

ROOT = Path(__file__).resolve().parents[1]

LEVERS = {
    "default": [],
    "blind": ["trainer.weighting=uniform"],  # uniform weights: what the weights add is default - blind
    "target_ess": ["trainer.target_ess=0.5"],
    "rank": ["trainer.weighting=rank", "trainer.temperature=0.3"],
    "antithetic": ["trainer.antithetic=true"],
    "scoring_batch": ["trainer.scoring_batch_size=256"],  # with the default batch_size 64
    "samples8": ["trainer.num_samples=8"],  # twice the decodes of the default K = 4
    "norms_biases": ["trainer.perturb_params=norms_biases"],
    "output": ["trainer.perturb_params=output"],
    "line_search": ["trainer.line_search_scales=[0.5,1,2,4]"],
    "line_search_only": ["trainer.line_search_scales=[0.5,1,2,4]", "trainer.proposal=zero"],
    # noise large enough to change the decoded outputs (../shared/notes/weight-signal.md: at about 30x the
    # first AdamW step the zero-centred samples' BLEU spreads by a point, rank-correlated across batches)
    "wide": ["trainer.noise_scale=30"],
    "wide_blind": ["trainer.noise_scale=30", "trainer.weighting=uniform"],
}
TABLE = ("lever", "seeds", *COLUMNS, "final_vs_blind", "best_vs_blind")


def run(name: str, seed: int, args, extra: list[str]) -> Path:
    out = Path(args.out) / f"{name}-seed{seed}"
    cmd = [sys.executable, "-m", "mleps_lab.train", "trainer=mgs", "trainer.warm_start_steps=0", f"init_from={args.init}",
           f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.eval_every or args.steps}",
           "trainer.save_every=1000000", "trainer.log_every=1", f"data.max_eval_examples={args.eval_examples}",
           f"trainer.diagnose_every={args.diagnose_every}", f"trainer.diagnose_examples={args.diagnose_examples}",
           f"seed={seed}", f"output_dir={out}", "overwrite=true", "progress=false", *LEVERS[name], *extra]
    print(f"[{name} seed {seed}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(Path(args.out) / f"{name}-seed{seed}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: lever {name} (seed {seed}) exited {proc.returncode}; see {log.name}")
    print(f"[{name} seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def average(rows: list[dict]) -> dict:
    out = {}
    for key in COLUMNS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    out["steps"] = rows[0]["steps"] if rows else 0
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="checkpoint folder every run starts from")
    parser.add_argument("--steps", type=int, required=True, help="MGS steps per run")
    parser.add_argument("--out", required=True, help="folder for the runs and the table")
    parser.add_argument("--levers", default="", help=f"comma-separated, from: {', '.join(LEVERS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--eval-examples", type=int, default=500, help="fixed validation subset (first N)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: only at the start and the end")
    parser.add_argument("--diagnose-every", type=int, default=5)
    parser.add_argument("--diagnose-examples", type=int, default=64)
    parser.add_argument("--lower-is-better", action="store_true", help="the validation metric is a loss")
    args = parser.parse_args(argv)
    levers = ["default", "blind"] + [n for n in args.levers.split(",") if n and n not in ("default", "blind")]
    unknown = [n for n in levers if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {', '.join(unknown)}: use {', '.join(LEVERS)}")
    if args.diagnose_examples > args.eval_examples:
        parser.error("--diagnose-examples must be at most --eval-examples (it is a slice of that subset)")
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)

    per_run = {}
    for name in levers:
        for seed in seeds:
            per_run[name, seed] = summarise(read_events(run(name, seed, args, extra)), not args.lower_is_better)
    rows = []
    for name in levers:
        row = {"lever": name, "seeds": len(seeds), **average([per_run[name, s] for s in seeds])}
        for key in ("final", "best"):
            deltas = [per_run[name, s][key] - per_run["blind", s][key] for s in seeds
                      if per_run[name, s][key] is not None and per_run["blind", s][key] is not None]
            row[f"{key}_vs_blind"] = sum(deltas) / len(deltas) if deltas else None
        rows.append(row)
    table = markdown_table(rows, TABLE)
    command = " ".join(["python", "scripts/screen_mgs.py", *sys.argv[1:]])
    (Path(args.out) / "screen.md").write_text(f"`{command}`\n\n{table}\n", encoding="utf-8")
    (Path(args.out) / "screen.json").write_text(json.dumps(
        {"command": command, "levers": {n: LEVERS[n] for n in levers}, "extra": extra, "rows": rows,
         "runs": {f"{n}-seed{s}": v for (n, s), v in per_run.items()}}, indent=1), encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()

"""The paper's comparison in one resumable command: python scripts/reproduce.py mt|summarization|scratch

Stages, each a list of subprocesses (`python -m mleps_lab.train ...` (mleps.train with the lab probes) / `python -m mleps.evaluate ...`,
one log file each, `progress=false`):

  base         MLE to its validation optimum (early stopping), or --base PATH
  calibration  a few steps of each rule from the base, in interleaved rounds: seconds per step
  lr_search    continued MLE at a few learning rates, seed 0, judged on validation only
  arms         every rule from the base's best checkpoint, per seed, at equal training time and at
               equal steps; each evaluates ~4 times on validation and keeps its best checkpoint
  test         mleps.evaluate of the base and of every arm's best checkpoint, greedy and beam 4

then the report (mleps_lab/reproduce_report.py): tables, paired bootstrap, plots, JSON and CSV.

Equal training time without depending on the machine's load: the calibration converts the time
budget T into a step count per rule, steps_r = round(T / s_r), and the arms run those fixed
step counts (deterministic, so a run repeated on a busy machine gives the same numbers). Equal
steps: N = MGS's count for every rule; MGS and MGS-blind runs serve both budgets.

Resuming: a training run whose dir holds summary.json is finished and skipped; one holding
metrics.jsonl or checkpoints/ is continued with resume=true; an evaluation is done when its
JSON file exists (written atomically). Every decision (step counts, the chosen lr) is a pure
function of finished runs' files, so a killed driver takes the same decisions again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from mleps.errors import UserError, exit_on_user_error
from mleps.rundir import read_events
from mleps_lab.runs import ROOT, shown, training_step_s, write_json_atomic


# The model that trains in seconds (tests/conftest.py's TINY_MODEL).
TINY_MODEL = ["model.vocab_size=300", "model.d_model=32", "model.layers=1", "model.heads=2",
              "model.ffn_dim=64", "model.dropout=0.0"]

# Each arm's overrides, applied from the base's best checkpoint. MLE's lr comes from the search.
ARMS = {
    "mle": ["trainer=mle", "trainer.schedule=constant", "trainer.warmup_steps=0"],
    "pg": ["trainer=pg"],
    # GRPO (trainer=grpo: group-normalised advantages, k3 KL to the start model): its own calibration, since
    # the frozen reference's forward makes its step dearer than pg's
    "grpo": ["trainer=grpo"],
    "mrt": ["trainer=mrt"],
    "mgs": ["trainer=mgs", "trainer.warm_start_steps=0"],
    # The same rule with uniform weights (the same samples, the update no longer sees the metric).
    # Reports before weighting=uniform existed used temperature=1e9, whose weights equal 1/K to ~1e-9.
    "mgs_blind": ["trainer=mgs", "trainer.warm_start_steps=0", "trainer.weighting=uniform"],
}
COST_OF = {"mgs_blind": "mgs"}  # the same decodes per step: one calibration serves both
# Settings that change what a step computes, not how much: an extra arm that differs from a standard
# arm only in these is costed like it (one calibration, and its runs serve both budgets). The
# held-out diagnostic does cost time, but it is left out of every step time (step_s - diagnose_s).
COST_FREE = ("trainer.temperature", "trainer.target_ess", "trainer.weighting", "trainer.noise_scale",
             "trainer.mixture_weight", "trainer.antithetic", "trainer.diagnose_every", "trainer.diagnose_examples")


def costed_like(overrides: list[str], arms: dict | None = None) -> str | None:
    """The standard arm whose step costs what these overrides' step costs, if one does."""
    def costly(o):
        return [x for x in o if x.split("=", 1)[0] not in COST_FREE]
    arms = ARMS if arms is None else arms
    return next((arm for arm, o in arms.items() if arm not in COST_OF and costly(o) == costly(overrides)), None)


@dataclass
class Task:
    name: str
    data: str  # mleps/conf/data option
    metric: str  # mleps/conf/metric option (validation and test)
    overrides: list[str]  # every training run (the MT defaults need none)
    arms: list[str]
    from_scratch: bool = False  # no base: every arm starts from random weights (one budget, no test)
    higher_is_better: bool = True  # of the validation score (False: a task loss, as in completion)
    budgets: tuple = ("equal_time", "equal_steps")
    base_select: str = "score"  # eval.select of the base: score, or cross_entropy (the MLE optimum)
    # test quantities reported per arm: evaluate's JSON key -> column name (chrf and mean_words are
    # added from the predictions); a completion evaluation adopts the checkpoint's data and metric
    test_keys: dict = field(default_factory=lambda: {"score": "test", "chrf": "chrf"})
    evaluate: list[str] = field(default_factory=list)  # every test evaluation of this task
    arm_overrides: dict = field(default_factory=dict)  # this task's own overrides of ARMS entries
    limits: tuple = ()  # decode limits at which the base is measured on validation before the arms (stage limits)
    score_with_base: bool = False  # metric=lm: every test evaluation scores with the base (metric.score_model)


# Sequence completion (the paper's headline): MGS against repetition and non-termination of greedy
# continuations. The training loss's components and weights are chosen on validation (docs/completion.md).
COMPLETION = ["data=completion", "data.whole_documents=true", "model=tiny_gpt2", "metric=composite",
              "metric.losses=[repetition,nontermination]",
              "metric.weights=[1.0,1.0]", "eval.metrics=[repetition,nontermination,edit,length]"]


# The paper's completion setting (wellecks/mgs seq_level/gpt2, docs/completion.md): whole sequences ending in
# EOS (here each AESLC email, ~115 tokens at the median, like WikiText-103's paragraphs), token-budget batches,
# MGS on the summed NLL of the decoded sequence under the frozen start model (MGS-LM); repetition and
# non-termination are measured, not optimised. "mgs" is the reference's proposal (trainer=mgs_paper),
# "mgs_blind" the same proposal with uniform weights, "mgs_default" the project's default proposal.
COMPLETION_PAPER = ["data=completion", "data.sequences=documents", "data.max_sequence_tokens=256", "model=tiny_gpt2",
                    "metric=lm", "metric.reduction=sum", "eval.metrics=[seq_rep,repetition,nontermination]",
                    "trainer.batch_tokens=4096"]
PAPER_ARMS = {
    "mgs": ["trainer=mgs_paper"],
    "mgs_blind": ["trainer=mgs_paper", "trainer.weighting=uniform"],
    # the same β = 1 as the paper's MGS-LM (trainer=mgs's α = 0.01 is scaled for 1 - BLEU/100): only the
    # proposal and the update differ
    "mgs_default": ["trainer=mgs", "trainer.warm_start_steps=0", "trainer.temperature=1.0"],
}

TASKS = {
    "mt": Task("mt", "multi30k_de_en", "bleu", [], ["mle", "pg", "grpo", "mrt", "mgs", "mgs_blind"]),
    # The base stops on validation cross-entropy: its ROUGE-L is a few points early in training and
    # jumps by more than its trend between evaluations, so stopping on it fired at step 800 (best
    # 3.99 at step 200) while the cross-entropy was still falling fast.
    "summarization": Task("summarization", "aeslc", "rouge", ["data=aeslc", "metric=rouge"],
                          ["mle", "pg", "mrt", "mgs", "mgs_blind"], base_select="cross_entropy"),
    "scratch": Task("scratch", "multi30k_de_en", "bleu", [], ["mle", "pg", "mgs", "mgs_blind"], from_scratch=True),
    "completion": Task("completion", "completion", "composite", COMPLETION, ["mle", "pg", "mrt", "mgs", "mgs_blind"],
                       higher_is_better=False, budgets=("equal_time",), base_select="cross_entropy",
                       test_keys={"score": "task_loss", **{k: k for k in ("repetition", "nontermination", "edit",
                                                                          "perplexity", "mean_words")}},
                       evaluate=["eval.metrics=[repetition,nontermination,edit,length]"]),
    "completion_paper": Task(
        "completion_paper", "completion", "lm", COMPLETION_PAPER,
        ["mle", "pg", "grpo", "mrt", "mgs", "mgs_blind", "mgs_default"],
        higher_is_better=False, base_select="cross_entropy",
        test_keys={"score": "task_loss", **{k: k for k in ("seq_rep", "repetition", "nontermination", "perplexity",
                                                           "mean_tokens")}},
        evaluate=["eval.metrics=[seq_rep,repetition,nontermination]", "per_example=true"],
        arm_overrides=PAPER_ARMS, limits=(50, 100, 200, 500), score_with_base=True),
}

# The paper's completion experiment on a real pretrained model: SmolLM2-135M (model=smollm2,
# docs/models.md) where the paper fine-tunes GPT-2 small, on AESLC paragraphs (data.sequences=paragraphs: each
# non-empty line of an email one sequence ending in EOS), a LoRA adapter trained from the MLE base. MGS-LM is
# the reference's proposal on the summed NLL under the frozen base (metric=lm metric.reduction=sum), MGS-blind
# its uniform-weight twin, MGS-steer the task-aware guide (trainer=mgs_steer) on the same loss. The model and
# its size are each budget's (`common`: model=smollm2, or the tiny budget's random tiny Llama).
COMPLETION_REAL = ["data=completion", "data.sequences=paragraphs", "metric=lm", "metric.reduction=sum",
                   "eval.metrics=[seq_rep,repetition,nontermination]"]
POPULATION = ["trainer.decode_population=batched"]  # the MGS rules: the K+1 parameter sets in one generate
REAL_ARMS = {
    "mgs": ["trainer=mgs_paper", *POPULATION],
    "mgs_blind": ["trainer=mgs_paper", "trainer.weighting=uniform", *POPULATION],
    "mgs_steer": ["trainer=mgs_steer", *POPULATION],
}
TASKS["completion_real"] = dataclasses.replace(
    TASKS["completion_paper"], name="completion_real", overrides=COMPLETION_REAL,
    arms=["mle", "pg", "grpo", "mrt", "mgs", "mgs_blind", "mgs_steer"], arm_overrides=REAL_ARMS,
    limits=(50, 100, 200, 500))


@dataclass
class Budget:
    name: str
    train_s: float  # T: training seconds per equal-time arm
    base: list[str]  # the base stage's overrides after `trainer=mle seed=0`
    arm_eval_examples: int | None  # validation sentences decoded at each of an arm's evaluations
    common: list[str] = field(default_factory=list)  # every training run
    sampling: list[str] = field(default_factory=list)  # runs of the decoding rules (pg, mrt, mgs)
    evaluate: list[str] = field(default_factory=list)  # every test evaluation
    calibration_steps: int = 6
    calibration_rounds: int = 2
    lrs: tuple = (3e-5, 1e-4, 3e-4)
    seeds: tuple = (0, 1, 2)
    beams: tuple = (1, 4)
    evaluations_per_arm: int = 4
    limits: tuple | None = None  # stage limits' decode limits (None: the task's)
    notes: str = ""
    # called with the run folder before the stages: writes what the runs need there (the tiny budget of
    # completion_real: its tiny Llama) and returns overrides added to every run's `common`
    prepare: Callable[[Path], list[str]] | None = None


# The converged base that fits the CPU budget: on all 29,000 pairs tiny_marian is still improving after
# 2,000 steps (35 minutes here), so the CPU budget trains on the first MT_TRAIN_PAIRS pairs, where it reaches
# its validation optimum and early stopping fires within the cap (docs/results.md shows the curve).
MT_TRAIN_PAIRS = 5000
SUMMARIZATION_TRAIN_PAIRS = 5000
# The decode limit: the paper evaluates to 500 new tokens; stage `limits` measures the base at 50..500.
PAPER_CPU_LIMIT = 500
# Each cpu budget's Setup paragraph (prose, in a data file), its numbers filled from the constants above.
NOTE_FIELDS = dict(mt_train_pairs=MT_TRAIN_PAIRS, summarization_train_pairs=SUMMARIZATION_TRAIN_PAIRS,
                   paper_cpu_limit=PAPER_CPU_LIMIT)
NOTES = {key: text.format(**NOTE_FIELDS)
         for key, text in yaml.safe_load(Path(__file__).with_name("budget_notes.yaml").read_text()).items()}
MT_BASE = ["trainer.max_steps=3000", "trainer.eval_every=100", "trainer.save_every=100", "trainer.patience=3",
           "trainer.max_train_s=1800", "data.max_eval_examples=500"]
TINY = dict(common=[*TINY_MODEL, "cpu=true", "trainer.batch_size=16", "data.max_train_examples=32",
                    "decode.max_new_tokens=24"],
            sampling=["trainer.max_new_tokens=24"],
            evaluate=["data.max_eval_examples=32", "decode.max_new_tokens=24"],
            calibration_steps=3, calibration_rounds=1, lrs=(1e-4, 1e-3), seeds=(0, 1), arm_eval_examples=32)
TINY_BASE = ["trainer.max_steps=12", "trainer.eval_every=4", "trainer.save_every=4", "trainer.patience=3",
             "data.max_eval_examples=32"]

BUDGETS = {
    ("mt", "cpu"): Budget(
        "cpu", train_s=90, base=MT_BASE, arm_eval_examples=300, common=[f"data.max_train_examples={MT_TRAIN_PAIRS}"],
        notes=NOTES["mt/cpu"]),
    ("mt", "tiny"): Budget("tiny", train_s=1.0, base=TINY_BASE, **TINY,
                           notes="the tests' tiny model, 32 sentences per split: exercises the pipeline only"),
    ("summarization", "cpu"): Budget(
        # greedy only: beam 4 on all 1,906 test emails costs about twice the greedy test stage (~25 min here)
        "cpu", train_s=60, arm_eval_examples=200, seeds=(0, 1, 2), beams=(1,),
        base=["trainer.max_steps=3000", "trainer.eval_every=150", "trainer.save_every=150", "trainer.patience=3",
              "trainer.max_train_s=1200", "data.max_eval_examples=300"],
        common=[f"data.max_train_examples={SUMMARIZATION_TRAIN_PAIRS}", "trainer.batch_size=32",
                "decode.max_new_tokens=32"],
        sampling=["trainer.max_new_tokens=32"],
        evaluate=["decode.max_new_tokens=32"],
        notes=NOTES["summarization/cpu"]),
    ("summarization", "tiny"): Budget("tiny", train_s=1.0, base=TINY_BASE, **TINY,
                                      notes="the tests' tiny model, 32 emails per split"),
    ("scratch", "cpu"): Budget(
        "cpu", train_s=600, base=[], arm_eval_examples=300, seeds=(0,), lrs=(), calibration_rounds=1,
        evaluations_per_arm=8,
        notes=NOTES["scratch/cpu"]),
    ("scratch", "tiny"): Budget("tiny", train_s=1.0, base=[], **{**TINY, "lrs": (), "seeds": (0,)},
                                notes="the tests' tiny model"),
}

COMPLETION_MODEL = ["model.d_model=128", "model.layers=2", "model.heads=4", "model.ffn_dim=512"]
BUDGETS[("completion", "cpu")] = Budget(
    "cpu", train_s=120, arm_eval_examples=1000, beams=(1,),
    base=["trainer.max_steps=3000", "trainer.eval_every=100", "trainer.save_every=100", "trainer.patience=3",
          "trainer.max_train_s=900", "data.max_eval_examples=null"],
    common=[*COMPLETION_MODEL, "decode.max_new_tokens=50"], sampling=["trainer.max_new_tokens=50"],
    evaluate=["decode.max_new_tokens=50", "data.max_eval_examples=null"],
    notes=NOTES["completion/cpu"])
# 32 emails tokenised with a 300-token vocabulary: none ends within 60 tokens, so no whole_documents
BUDGETS[("completion", "tiny")] = Budget("tiny", train_s=1.0, base=TINY_BASE,
                                         **{**TINY, "beams": (1,), "common": [*TINY["common"],
                                                                             "data.whole_documents=false"]},
                                         notes="the tests' tiny model, 32 emails per split")

BUDGETS[("completion_paper", "cpu")] = Budget(
    "cpu", train_s=60, arm_eval_examples=100, beams=(1,), lrs=(1e-5, 6.25e-5, 3e-4), evaluations_per_arm=3,
    base=["trainer.max_steps=4000", "trainer.eval_every=250", "trainer.save_every=250", "trainer.patience=3",
          "trainer.max_train_s=1500", "data.max_eval_examples=250"],
    common=[*COMPLETION_MODEL, f"decode.max_new_tokens={PAPER_CPU_LIMIT}"],
    sampling=["trainer.max_length_ratio=1.3", f"trainer.max_new_tokens={PAPER_CPU_LIMIT}"],
    evaluate=[f"decode.max_new_tokens={PAPER_CPU_LIMIT}", "data.max_eval_examples=100"],
    notes=NOTES["completion_paper/cpu"])
# Fewer arms for longer (--arms mle mgs mgs_blind, --base the cpu budget's base): what 8 minutes of MGS-LM do.
# Continued MLE keeps the lr the cpu budget chose on validation (one lr: its search run is its seed-0 arm).
BUDGETS[("completion_paper", "long")] = dataclasses.replace(
    BUDGETS[("completion_paper", "cpu")], name="long", train_s=480, seeds=(0,), lrs=(3e-4,),
    notes=BUDGETS[("completion_paper", "cpu")].notes + " Long budget: 480 s per arm, one seed, the cpu budget's "
          "base; continued MLE at the lr the cpu budget's search chose on validation.")
BUDGETS[("completion_paper", "tiny")] = Budget(
    "tiny", train_s=1.0, base=TINY_BASE,
    **{**TINY, "beams": (1,),
       "common": [*TINY["common"], "data.max_sequence_tokens=500", "trainer.batch_tokens=2000"],
       "sampling": ["trainer.max_new_tokens=24", "trainer.max_length_ratio=1.3"], "limits": (8, 16, 24)},
    notes="the tests' tiny model, 32 emails per split")

# completion_real. Step costs measured on this CPU (docs/results/smollm2-sizing.json, one torch thread, load
# 6-13): one MGS step at batch 8, K = 4, 32-token training decodes 162 s (whole model, sequential population
# decoding: an upper bound for LoRA with batched decoding), one PG step 50 s, greedy decoding 0.45 s per step
# at batch 8. docs/completion.md ("The experiment on SmolLM2-135M") adds them up for each budget.
REAL_MODEL = ["model=smollm2", "model.peft=lora"]
BUDGETS[("completion_real", "cpu")] = Budget(
    # documented with its expected time, not run here: the smallest budget that still compares the arms on
    # test outputs from a base that has seen the paragraphs (3 MGS steps per arm and seed)
    "cpu", train_s=480, arm_eval_examples=32, beams=(1,), lrs=(1e-4, 1e-3), seeds=(0, 1), evaluations_per_arm=2,
    calibration_steps=2, calibration_rounds=1, limits=(32, 100),
    base=["trainer.max_steps=400", "trainer.eval_every=50", "trainer.save_every=50", "trainer.patience=2",
          "trainer.max_train_s=1200", "data.max_eval_examples=64"],
    common=[*REAL_MODEL, "data.max_sequence_tokens=128", "trainer.batch_size=8", "decode.max_new_tokens=32"],
    sampling=["trainer.max_new_tokens=32", "trainer.max_length_ratio=1.3"],
    evaluate=["decode.max_new_tokens=32", "data.max_eval_examples=100"],
    notes=NOTES["completion_real/cpu"])
BUDGETS[("completion_real", "gpu")] = Budget(
    # the paper's setting as far as it maps (documented, not run here: no GPU was lent): 500-token test
    # decodes, training decodes to 1.3 x the longest reference (at most 1,000), 1,024-token batches, 2 hours
    # per arm (thousands of MGS steps at <= 3.6 s each), 5 seeds, continued MLE's lr searched on validation
    "gpu", train_s=7200, arm_eval_examples=250, beams=(1,), lrs=(3e-5, 1e-4, 3e-4, 1e-3), seeds=(0, 1, 2, 3, 4),
    evaluations_per_arm=10, calibration_steps=20, calibration_rounds=2,
    base=["trainer.max_steps=20000", "trainer.eval_every=500", "trainer.save_every=500", "trainer.patience=5",
          "trainer.max_train_s=7200", "data.max_eval_examples=250"],
    common=[*REAL_MODEL, "trainer.batch_tokens=1024", "decode.max_new_tokens=500"],
    sampling=["trainer.max_new_tokens=1000", "trainer.max_length_ratio=1.3"],
    evaluate=["decode.max_new_tokens=500", "data.max_eval_examples=null"],
    notes=NOTES["completion_real/gpu"])


def tiny_llama_overrides(out: Path) -> list[str]:
    """The tiny budget's model: a random tiny Llama (SmolLM2's module types) written once into the run folder."""
    from mleps_lab.tiny_llama import write_tiny_llama

    data = Path(os.environ.get("MLEPS_DATA_DIR") or ROOT / "data")
    data = data if data.is_absolute() else ROOT / data
    if not (data / "aeslc" / "train.jsonl").is_file():
        raise UserError(f"{data / 'aeslc' / 'train.jsonl'} not found: run `make data` or set MLEPS_DATA_DIR")
    return ["model=hf", f"model.name_or_path={write_tiny_llama(out / 'tiny_llama', data / 'aeslc' / 'train.jsonl')}",
            "model.peft=lora"]


BUDGETS[("completion_real", "tiny")] = Budget(
    # lr 1e-2 everywhere: at presets' rates a random model's zero-initialised adapter moves no greedy output
    "tiny", train_s=1.0, base=["trainer.max_steps=4", "trainer.eval_every=4", "trainer.save_every=4",
                               "trainer.lr=1e-2", "data.max_eval_examples=16"],
    arm_eval_examples=16, beams=(1,), lrs=(1e-2,), seeds=(0,), calibration_steps=2, calibration_rounds=1,
    evaluations_per_arm=2, limits=(8, 16),
    common=["cpu=true", "trainer.batch_size=8", "data.max_train_examples=32", "data.max_sequence_tokens=60",
            "decode.max_new_tokens=16"],
    sampling=["trainer.max_new_tokens=16", "trainer.max_length_ratio=1.3", "trainer.lr=1e-2"],
    evaluate=["data.max_eval_examples=16", "decode.max_new_tokens=16"],
    prepare=tiny_llama_overrides,
    notes="a random tiny Llama (2 layers, 32 wide, SmolLM2's module types) with a 300-token BPE, LoRA, 32 "
          "training paragraphs, 16 per evaluation: exercises the pipeline only")

# Documented, not run here (GPU scale): the paper's setting.
PAPER = """\
`--budget paper` (documented, not run on this machine; needs a GPU and the internet):
  data     IWSLT'14 de->en: fairseq's prepare-iwslt14.sh output as data=local JSONL files (or the
           hub's iwslt2017 de-en config), BPE 10k
  model    transformer-base sizes: model.d_model=512 model.layers=6 model.heads=8 model.ffn_dim=2048
           model.vocab_size=10000 model.dropout=0.3
  base     trainer=mle trainer.max_steps=100000 trainer.batch_size=4096-token-equivalent
           trainer.lr=5e-4 trainer.warmup_steps=4000 trainer.patience=5, validated on all of dev
  arms     MGS / MRT / PG fine-tuning as in Welleck & Cho (2021): K = 4 perturbations,
           beta = 100 (trainer.temperature=0.01), ~5,000 fine-tuning steps, MLE continued for the
           same wall time, 3 seeds; test on tst2014, beam 4 (and greedy)
Run it with this driver's mt stages by adding those overrides to the budget (BUDGETS in mleps_lab/reproduce.py)."""
PAPER_COMPLETION = """\
`completion_paper --budget paper` (documented, not run on this machine; needs a GPU and the internet):
  data     WikiText-103 raw: python scripts/export_wikitext103.py, then data=wikitext103 (each non-empty
           line a paragraph and one sequence ending in EOS, <= 10 tokens dropped; 10-token prompts)
  batches  trainer.batch_tokens=1024 (length-sorted, the reference's --chunk-size-train)
  model    GPT-2 small from the hub: model=hf model.name_or_path=gpt2
  base     trainer=mle fine-tuned to its validation perplexity optimum (eval.select=cross_entropy,
           trainer.patience=5)
  arms     trainer=mgs_paper (MGS-LM: metric=lm metric.reduction=sum, scored by the frozen base),
           its uniform-weight twin, trainer=mgs, PG, GRPO and MRT on the same loss, MLE continued for the
           same wall time, 5 seeds; decode.max_new_tokens=500 trainer.max_new_tokens=1000
           trainer.max_length_ratio=1.3; validation on 250 sequences, patience 5
  report   seq-rep-4 per continuation and pooled, non-termination, mean length, the references'
           perplexity, the task loss (Welleck & Cho 2021, Table 1)
Run it with this driver's completion_paper stages by putting those overrides in the budget."""
PAPER_COMPLETION_REAL = """\
`completion_real --budget paper`: the GPU budget of the experiment on SmolLM2-135M (documented, NOT run in
this project: no GPU was lent to the session that wrote it). On one GPU, offline once prepared:
  python scripts/prepare_smollm2.py                       # once: the model=smollm2 folder (docs/models.md)
  python scripts/reproduce.py completion_real --budget gpu --jobs 2
resumable in runs of any length (a killed driver resumes at its first unfinished run). Its budget
(BUDGETS[("completion_real", "gpu")] in mleps_lab/reproduce.py):
  data     AESLC paragraphs (data.sequences=paragraphs), 1,024-token length-sorted batches
  model    model=smollm2 model.peft=lora; the base: LoRA MLE to its validation cross-entropy optimum
           (eval every 500 steps, patience 5, at most 20,000 steps or 2 hours)
  arms     MGS-LM (trainer=mgs_paper), MGS-blind (weighting=uniform), MGS-steer (trainer=mgs_steer), PG-LM,
           GRPO-LM, MRT-LM on metric=lm metric.reduction=sum (the frozen base's summed NLL), continued MLE at
           the lr chosen on validation among 3e-5, 1e-4, 3e-4, 1e-3; 2 hours per arm (equal time) and MGS's
           step count (equal steps), 5 seeds, 10 validations of 250 paragraphs per arm
  test     greedy to 500 new tokens on every test paragraph; the base against 50/100/200/500 on validation
Expected cost: docs/completion.md ("The experiment on SmolLM2-135M")."""
PAPERS = {"mt": PAPER, "completion": PAPER_COMPLETION, "completion_paper": PAPER_COMPLETION,
          "completion_real": PAPER_COMPLETION_REAL}


class RunFailed(UserError):
    exit_code = 1


@dataclass
class Job:
    """One subprocess: `python -m <argv>`. Done when `done_file` exists."""

    name: str
    argv: list[str]
    done_file: Path
    log: Path
    run_dir: Path | None = None  # training: a dir holding a run is continued with resume=true
    after: Callable[["Job"], None] | None = None  # evaluations: turn the output into done_file

    @property
    def done(self) -> bool:
        return self.done_file.is_file()

    def command(self) -> list[str]:
        resume = self.run_dir is not None and (
            (self.run_dir / "metrics.jsonl").exists() or (self.run_dir / "checkpoints").exists())
        return [sys.executable, "-m", *self.argv, *(["resume=true"] if resume else [])]


def run_module_forked(argv: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """`python -m argv...` in a process forked from the preloading server (Runner(preload=True)): torch,
    transformers and mleps are imported already, which is most of a tiny run's seconds. What a fresh
    interpreter would see is set first: the environment, the folder, argv, stdout/stderr into the log,
    and torch's thread count (the server read OMP_NUM_THREADS when it imported torch, not this job's)."""
    import atexit
    import runpy
    import traceback

    import torch

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True)  # as PYTHONUNBUFFERED: the log keeps the processes' order
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.path[:0] = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]  # as `python -m` starts
    sys.argv = list(argv)
    code = 0
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # os._exit skips them (mleps.rundir releases its run-dir lock in one)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


PRELOAD = ["mleps_lab.reproduce", "mleps_lab.train", "mleps.evaluate", "mleps.train", "mleps.loop"]


class Runner:
    """Runs a stage's unfinished jobs, `jobs` at a time, with one progress line per stage.

    preload: start each job by forking a server that imported torch, transformers and mleps once
    (multiprocessing's forkserver) instead of a fresh `python -m`, which spends about 7 s of CPU importing
    them; the job itself runs as `python -m` would (run_module_forked). The tests use it (their runs last
    seconds); the documented runs keep fresh interpreters."""

    def __init__(self, jobs: int = 2, progress: bool = True, preload: bool = False):
        self.jobs = max(1, jobs)
        self.progress = progress
        self.context = None
        if preload:
            import multiprocessing

            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(PRELOAD)

    @staticmethod
    def env_for(at_once: int) -> dict[str, str]:
        """The processes' environment when `at_once` run together: they share the cores, so each gets its
        share of torch threads (a stage of one job, such as the base, gets them all)."""
        threads = str(max(1, (os.cpu_count() or 1) // max(1, at_once)))
        return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def run_stage(self, stage: str, jobs: list[Job], on_done: Callable[[], None] | None = None) -> None:
        """Runs the jobs not yet done; `on_done` is called after each one finishes."""
        from tqdm.auto import tqdm

        todo = [j for j in jobs if not j.done]
        env = self.env_for(min(self.jobs, len(todo)))
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"{stage:<12}", disable=not self.progress,
                   dynamic_ncols=True, leave=True, file=sys.stdout)
        with ThreadPoolExecutor(self.jobs) as pool:
            for job in pool.map(lambda j: self._run(j, env), todo):
                bar.set_postfix_str(job.name)
                bar.update(1)
                if on_done is not None:
                    on_done()
        bar.close()

    def _run(self, job: Job, env: dict[str, str]) -> Job:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as log:
            log.write(f"\n$ {shown(job.command()[2:])}\n")
            log.flush()
            if self.context is None:
                returncode = subprocess.run(job.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if self.context is not None:
            process = self.context.Process(target=run_module_forked,
                                           args=(job.command()[2:], str(job.log), env, str(ROOT)))
            process.start()
            process.join()
            returncode = process.exitcode
        if returncode != 0:
            tail = job.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise RunFailed(f"{job.name} failed (exit {returncode}): {tail[0][:300]} -- see {job.log}; "
                            f"fix it and run the same command again to resume")
        if job.after is not None:
            job.after(job)
        if not job.done:
            raise RunFailed(f"{job.name} exited 0 but wrote no {job.done_file}; see {job.log}")
        return job


def best_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "best"


class Reproduction:
    """The stages of one task under one budget, in `out`."""

    def __init__(self, task: str, budget: str, out: Path, seeds: list[int] | None = None,
                 base: Path | None = None, beams: list[int] | None = None, jobs: int = 2, progress: bool = True,
                 extra_arms: dict[str, list[str]] | None = None, only_arms: list[str] | None = None,
                 calibration_from: Path | None = None, preload: bool = False):
        if task not in TASKS:
            raise UserError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
        if budget == "paper":
            raise UserError("--budget paper is documented, not runnable on CPU: see `scripts/reproduce.py --help`")
        if (task, budget) not in BUDGETS:
            raise UserError(f"unknown budget '{budget}' for {task}: use "
                            f"{', '.join(b for t, b in BUDGETS if t == task)} or paper")
        self.task, self.budget = TASKS[task], BUDGETS[(task, budget)]
        self.arms = {**ARMS, **self.task.arm_overrides}
        self.cost_of = dict(COST_OF)
        for name, overrides in (extra_arms or {}).items():
            if name in ARMS or not name.replace("_", "").isalnum():
                raise UserError(f"--arm {name}=...: give a new arm a fresh name of letters, digits and _ "
                                f"(not one of {', '.join(ARMS)})")
            if not any(o.startswith("trainer=") for o in overrides):
                raise UserError(f"--arm {name}={' '.join(overrides)}: name its rule, e.g. --arm {name}='trainer=mgs "
                                f"trainer.warm_start_steps=0 ...'")
            self.arms[name] = list(overrides)
            if like := costed_like(overrides, {a: o for a, o in self.arms.items() if a != name}):
                self.cost_of[name] = like
        if extra_arms:
            self.task = dataclasses.replace(self.task, arms=[*self.task.arms, *extra_arms])
        if only_arms:  # a subset of the task's arms (equal steps still follow MGS's count)
            unknown = [a for a in only_arms if a not in self.task.arms]
            if unknown or "mgs" not in only_arms:
                raise UserError(f"--arms {' '.join(only_arms)}: name arms of {self.task.name} "
                                f"({', '.join(self.task.arms)}), mgs among them")
            self.task = dataclasses.replace(self.task, arms=[a for a in self.task.arms if a in only_arms])
        if beams:
            if any(b < 1 for b in beams):
                raise UserError(f"--beams {beams}: beam sizes are 1 (greedy) or more")
            self.budget = dataclasses.replace(self.budget, beams=tuple(dict.fromkeys(beams)))
        self.out = Path(out).resolve()
        self.seeds = list(seeds) if seeds else list(self.budget.seeds)
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise UserError(f"--seeds {self.seeds}: give distinct non-negative integers, e.g. --seeds 0 1 2")
        if base is not None:
            base = Path(base).resolve()
            if not (base / "config.json").is_file():
                raise UserError(f"--base {base} is not a checkpoint folder (no config.json): pass a folder "
                                f"written by mleps.train, e.g. RUN/checkpoints/best")
            if self.task.from_scratch:
                raise UserError("--base makes no sense for scratch: every arm starts from random weights")
        self.given_base = base
        # another run dir of the same task whose calibration runs to reuse (its seconds per step, measured
        # there; they do not depend on the time budget)
        self.calibration_root = Path(calibration_from).resolve() / "calibration" if calibration_from else None
        self._lock = threading.Lock()
        self.runner = Runner(jobs, progress, preload)

    # -- paths and commands -----------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.out / "base"

    @property
    def base_checkpoint(self) -> Path:
        return self.given_base or best_checkpoint(self.base_dir)

    def train_job(self, name: str, run_dir: Path, overrides: list[str]) -> Job:
        argv = ["mleps_lab.train", *overrides, "progress=false", f"output_dir={run_dir}"]  # the library CLI + probes
        return Job(name, argv, run_dir / "summary.json", self.out / "logs" / f"{name.replace('/', '_')}.log",
                   run_dir=run_dir)

    def rule_overrides(self, arm: str, steps: int, seed: int, lr: float | None = None,
                       validate: bool = True) -> list[str]:
        b = self.budget
        every = max(steps // b.evaluations_per_arm, 1)
        rule = list(self.arms[arm])
        if self.task.from_scratch and arm == "mle":
            rule = ["trainer=mle"]  # its from-scratch recipe (warm-up, inverse sqrt)
        elif arm == "mle":
            rule.append(f"trainer.lr={lr if lr is not None else 1e-4:g}")
        init = [] if self.task.from_scratch else [f"init_from={self.base_checkpoint}"]
        evals = ([f"data.max_eval_examples={b.arm_eval_examples}"] if b.arm_eval_examples else []) if validate \
            else ["data.validation_file=null"]
        if not validate and any(o.split("=", 1)[0] == "trainer.oracle_rows" for o in rule):
            # its weights come from validation rows: the file stays, with the subset those rows must not
            # overlap, and no evaluation falls among the timed steps
            evals = [f"data.max_eval_examples={b.arm_eval_examples}", f"trainer.eval_every={steps + 1}"]
        return [*rule, *self.task.overrides, *init, f"seed={seed}", f"trainer.max_steps={steps}",
                f"trainer.eval_every={every}", f"trainer.save_every={every}", "trainer.log_every=1", *evals,
                *b.common, *([] if arm == "mle" else b.sampling)]

    # -- base -------------------------------------------------------------------
    def stage_base(self) -> list[Job]:
        if self.given_base or self.task.from_scratch:
            return []
        select = [f"eval.select={self.task.base_select}"] if self.task.base_select != "score" else []
        return [self.train_job("base", self.base_dir, ["trainer=mle", "seed=0", *self.budget.base,
                                                        *self.task.overrides, *select, *self.budget.common])]

    # -- limits: the base's degeneration against the decode limit (validation) ----------
    def limits(self) -> tuple:
        return self.task.limits if self.budget.limits is None else self.budget.limits

    def limit_file(self, limit: int) -> Path:
        return self.out / "limits" / f"max_new_tokens{limit}.json"

    def stage_limits(self) -> list[Job]:
        """The base decoded greedily on the arms' validation rows at each of the task's limits: how
        non-termination and repetition grow with the limit (the limit itself is the budget's choice)."""
        jobs = []
        for limit in self.limits():
            done = self.limit_file(limit)
            argv = ["mleps.evaluate", f"checkpoint={self.base_checkpoint}", *self.task.evaluate, "split=validation",
                    f"predictions={done.with_suffix('.txt')}", "progress=false", *self.budget.evaluate,
                    f"decode.max_new_tokens={limit}", f"data.max_eval_examples={self.budget.arm_eval_examples}"]
            jobs.append(Job(f"limits/{limit}", argv, done, self.out / "logs" / f"limits-{limit}.log",
                            after=self._score_predictions))
        return jobs

    # -- calibration: seconds per step of each rule ------------------------------
    def calibration_rules(self) -> list[str]:
        return [a for a in self.task.arms if a not in self.cost_of]

    def calibration_dirs(self) -> dict[str, list[Path]]:
        rounds = range(self.budget.calibration_rounds)
        root = self.calibration_root or self.out / "calibration"
        return {rule: [root / f"{rule}-r{r}" for r in rounds] for rule in self.calibration_rules()}

    def stage_calibration(self) -> list[Job]:
        # Interleaved rounds (mle, pg, mrt, mgs, mle, ...): a slow spell of the machine hits every rule.
        dirs = self.calibration_dirs()
        jobs = []
        for r in range(self.budget.calibration_rounds):
            for rule in dirs:
                jobs.append(self.train_job(f"calibration/{rule}-r{r}", dirs[rule][r], self.rule_overrides(
                    rule, self.budget.calibration_steps, seed=0, validate=False)))
        return jobs

    def step_seconds(self) -> dict[str, float]:
        """Mean `step_s` of each rule's calibration steps, the first step of each run left out (warm-up)."""
        seconds = {}
        for rule, dirs in self.calibration_dirs().items():
            times = [training_step_s(e) for d in dirs for e in read_events(d, "train") if e["step"] > 1]
            seconds[rule] = sum(times) / len(times)
        for arm, like in self.cost_of.items():
            if arm in self.task.arms:
                seconds[arm] = seconds[like]
        return seconds

    def steps_for_time(self) -> dict[str, int]:
        return {arm: max(1, round(self.budget.train_s / s)) for arm, s in self.step_seconds().items()}

    # -- continued MLE's learning rate, chosen on validation ---------------------------
    def lr_dir(self, lr: float) -> Path:
        return self.out / "lr_search" / f"lr{lr:g}"

    def searches_lr(self) -> bool:
        """Continued MLE is an arm (--arms may leave it out) whose lr this budget chooses."""
        return not self.task.from_scratch and bool(self.budget.lrs) and "mle" in self.task.arms

    def stage_lr_search(self) -> list[Job]:
        if not self.searches_lr():
            return []
        steps = self.steps_for_time()["mle"]
        return [self.train_job(f"lr_search/lr{lr:g}", self.lr_dir(lr), self.rule_overrides("mle", steps, seed=0, lr=lr))
                for lr in self.budget.lrs]

    def lr_scores(self) -> dict[float, float]:
        """Best validation score after step 0 of each lr (step 0 is the base, the same for all)."""
        best = max if self.task.higher_is_better else min
        return {lr: best(e["score"] for e in read_events(self.lr_dir(lr), "validation") if e["step"] > 0)
                for lr in self.budget.lrs}

    def best_lr(self) -> float | None:
        if not self.searches_lr():
            return None
        scores = self.lr_scores()
        return (max if self.task.higher_is_better else min)(scores, key=scores.get)

    # -- arms -----------------------------------------------------------------------
    def budgets(self) -> list[str]:
        return ["equal_time"] if self.task.from_scratch else list(self.task.budgets)

    def arm_steps(self) -> dict[str, dict[str, int]]:
        """budget -> arm -> steps."""
        time_steps = self.steps_for_time()
        out = {"equal_time": time_steps}
        if "equal_steps" in self.budgets():
            n = time_steps["mgs"]
            out["equal_steps"] = {arm: n for arm in self.task.arms}
        return out

    def arm_runs(self) -> dict[tuple[str, str, int], Path]:
        """(budget, arm, seed) -> run dir. A run that serves both budgets appears under both."""
        steps, lr = self.arm_steps(), self.best_lr()
        runs = {}
        for seed in self.seeds:
            for arm in self.task.arms:
                t = steps["equal_time"][arm]
                runs[("equal_time", arm, seed)] = self.out / "arms" / arm / f"steps{t}" / f"seed{seed}"
                if arm == "mle" and seed == 0 and lr is not None:  # the search's winner is this very run
                    runs[("equal_time", arm, seed)] = self.lr_dir(lr)
                if "equal_steps" in steps:
                    n = steps["equal_steps"][arm]
                    runs[("equal_steps", arm, seed)] = runs[("equal_time", arm, seed)] if n == t else \
                        self.out / "arms" / arm / f"steps{n}" / f"seed{seed}"
        return runs

    def stage_arms(self) -> list[Job]:
        steps, lr, jobs = self.arm_steps(), self.best_lr(), {}
        for (budget, arm, seed), run_dir in self.arm_runs().items():
            if run_dir not in jobs:
                jobs[run_dir] = self.train_job(str(run_dir.relative_to(self.out)), run_dir,
                                               self.rule_overrides(arm, steps[budget][arm], seed, lr=lr))
        return list(jobs.values())

    # -- test ---------------------------------------------------------------------------
    def decodes(self) -> dict[str, int]:
        return {("greedy" if b == 1 else f"beam{b}"): b for b in self.budget.beams}

    def test_file(self, run_label: str, decode: str) -> Path:
        return self.out / "test" / f"{run_label.replace('/', '_')}-{decode}.json"

    def tested(self) -> dict[str, Path]:
        """label -> checkpoint of everything evaluated on test."""
        if self.task.from_scratch:
            return {}
        out = {"base": self.base_checkpoint}
        for run_dir in dict.fromkeys(self.arm_runs().values()):
            out[str(run_dir.relative_to(self.out))] = best_checkpoint(run_dir)
        return out

    def stage_test(self) -> list[Job]:
        jobs = []  # every greedy decode first: the cheap, primary numbers are there early
        for decode, beams in self.decodes().items():
            for label, ckpt in self.tested().items():
                done = self.test_file(label, decode)
                # a completion checkpoint brings its own data and metric (composite with its components)
                task = [] if self.task.evaluate else [f"data={self.task.data}", f"metric={self.task.metric}"]
                # metric=lm: every checkpoint's outputs scored by the same frozen base, not by itself
                scorer = [f"metric.score_model={self.base_checkpoint}"] if self.task.score_with_base else []
                argv = ["mleps.evaluate", f"checkpoint={ckpt}", *task, *self.task.evaluate, *scorer,
                        "split=test", f"decode.num_beams={beams}", f"predictions={done.with_suffix('.txt')}",
                        "progress=false", *self.budget.evaluate]
                jobs.append(Job(f"test/{label}/{decode}", argv, done, self.out / "logs" / f"{done.stem}.log",
                                after=self._score_predictions))
        return jobs

    def references(self) -> list[list[str]]:
        """The test split's references, cut like the evaluations cut it."""
        with self._lock:  # evaluations finish on several threads; Hydra's compose is global state
            return self._load_references()

    def _load_references(self) -> list[list[str]]:
        if not hasattr(self, "_references"):
            from mleps.data import load_split

            self._references = list(load_split(self.test_data_cfg(), "test")["references"])
        return self._references

    def test_data_cfg(self):
        """The data config of the test evaluations: the task's data, cut as the runs cut it (the
        budget's overrides come after the task's)."""
        from hydra import compose, initialize_config_dir

        from mleps.config import register_configs

        register_configs()
        cuts = [o for o in self.task.overrides + self.budget.common + self.budget.evaluate if o.startswith("data.")]
        with initialize_config_dir(config_dir=str(ROOT / "mleps" / "conf"), version_base="1.3"):
            return compose(config_name="evaluate", overrides=["checkpoint=unused", f"data={self.task.data}", *cuts]).data

    def completion_examples(self) -> list[tuple[str, str]]:
        """(prefix, reference continuation) of each test example, in evaluate's order."""
        from transformers import AutoTokenizer

        from mleps.data import completion_pairs, load_split

        data = self.test_data_cfg()
        tokenizer = AutoTokenizer.from_pretrained(self.base_checkpoint)
        pairs = completion_pairs(load_split(data, "test"), tokenizer, data, "test")
        return list(zip(pairs["source"], pairs["target"]))

    def _score_predictions(self, job: Job) -> None:
        """evaluate's last JSON line, plus chrF of the same predictions (sacrebleu, through mleps.metrics)."""
        from mleps.metrics import build_metric

        lines = [line for line in job.log.read_text().splitlines() if line.startswith("{")]
        result = json.loads(lines[-1])
        hyps = Path(result["predictions"]).read_text(encoding="utf-8").splitlines()
        if "chrf" in self.task.test_keys:
            chrf = build_metric("chrf").corpus_score(hyps, self.references())
            result["chrf"], result["chrf_signature"] = chrf["score"], chrf["signature"]
        if "mean_words" in self.task.test_keys:
            result["mean_words"] = sum(len(h.split()) for h in hyps) / max(len(hyps), 1)
        if "mean_tokens" in self.task.test_keys:  # from evaluate's per_example=true file
            rows = [json.loads(line) for line in Path(result["per_example"]).read_text().splitlines()]
            result["mean_tokens"] = sum(r["tokens"] for r in rows) / max(len(rows), 1)
        write_json_atomic(job.done_file, result)

    # -- everything -------------------------------------------------------------------------
    def stages(self) -> list[tuple[str, Callable[[], list[Job]]]]:
        # Functions, not lists: a later stage's jobs depend on the earlier stages' results.
        return [("base", self.stage_base), ("limits", self.stage_limits), ("calibration", self.stage_calibration),
                ("lr_search", self.stage_lr_search), ("arms", self.stage_arms), ("test", self.stage_test)]

    @property
    def timings_file(self) -> Path:
        return self.out / "timings.json"

    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds each stage has spent running jobs, summed over every invocation of the driver
        (a resumed one adds its own; a stage found finished adds nothing). Written after every finished
        job, so a killed driver loses only the time since its last finished job."""
        return json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}

    def run(self, until: str | None = None) -> dict | None:
        """Every stage, or the stages up to and including `until` (then no report: None)."""
        names = [name for name, _ in self.stages()]
        if until is not None and until not in names:
            raise UserError(f"--until {until}: use one of {', '.join(names)}")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.budget.prepare is not None:  # once per driver: the budget's files and their overrides
            self.budget = dataclasses.replace(self.budget, common=[*self.budget.common, *self.budget.prepare(self.out)],
                                              prepare=None)
        commands, seconds = {}, self.stage_seconds()
        for name, make in self.stages():
            jobs = make()
            commands[name] = [shown(j.argv) for j in jobs]
            before, start = seconds.get(name, 0.0), time.monotonic()

            def record():  # called inside run_stage, so name, before and start are this stage's
                seconds[name] = before + time.monotonic() - start
                write_json_atomic(self.timings_file, seconds)

            self.runner.run_stage(name, jobs, on_done=record)
            if name == until:
                return None
        from mleps_lab.reproduce_report import collect

        return collect(self, commands)


# -- the command line: python -m mleps_lab.reproduce TASK ... (python scripts/reproduce.py is the same)
USAGE = """Reproduce the paper's comparisons in one resumable command.

    python scripts/reproduce.py mt                      # the MT comparison, CPU budget (target 100 min; the report times each stage)
    python scripts/reproduce.py mt --budget tiny --out /tmp/r   # the pipeline in ~2 minutes
    python scripts/reproduce.py summarization           # AESLC, ROUGE-L, a smaller budget
    python scripts/reproduce.py scratch                 # MLE, PG and MGS from random weights
    python scripts/reproduce.py completion_paper        # the paper's completion setting: MGS-LM, 500-token decodes
    python scripts/reproduce.py completion_real         # the same on SmolLM2-135M (LoRA); --budget gpu|tiny, paper: its GPU command

Killed, it resumes at the first unfinished run when called again with the same arguments.
Stages and design: mleps_lab/reproduce.py. Writes docs/results/<task>.md (e.g. docs/results/mt.md),
plots in docs/results/img/ and the numbers in docs/results/<task>.json + .csv.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, epilog=PAPER, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--budget", default="cpu", choices=["cpu", "tiny", "long", "gpu", "paper"],
                   help="long: completion_paper only, fewer arms for longer (with --arms and --base); "
                        "gpu: completion_real only, needs a CUDA device")
    p.add_argument("--out", help="run folder (default runs/reproduce/<task>)")
    p.add_argument("--seeds", type=int, nargs="+", help="arm seeds (default: the budget's, 0 1 2 for mt)")
    p.add_argument("--base", help="a checkpoint folder to start the arms from (skips the base stage)")
    p.add_argument("--beams", type=int, nargs="+", help="test decodes' beam sizes (default: the budget's, 1 4)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an extra arm, calibrated and run like the others, e.g. "
                        "--arm mgs_line='trainer=mgs trainer.warm_start_steps=0 trainer.line_search_scales=[1,2,4]'")
    p.add_argument("--calibration-from", metavar="OUT", help="reuse the calibration runs of another --out of the "
                                                             "same task (seconds per step do not depend on T)")
    p.add_argument("--arms", nargs="+", help="run only these of the task's arms (mgs among them)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each when > 1")
    p.add_argument("--results-md", help="default docs/results/<task>.md")
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "results" / "img"))
    p.add_argument("--json", help="default docs/results/<task>.json (a .csv is written beside it)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage (base, limits, calibration, lr_search, "
                                                      "arms, test); no report then")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--preload", action="store_true", help="fork every run from one process that imported torch and "
                   "mleps once (saves ~7 s of CPU per run; for tiny budgets and tests)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.budget == "paper":
        if args.task not in PAPERS:
            raise UserError(f"--budget paper is documented for {' and '.join(PAPERS)} only")
        print(PAPERS[args.task])
        return
    if args.budget == "gpu" and (args.task, "gpu") in BUDGETS:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--budget gpu needs a CUDA device and none is visible: `scripts/reproduce.py {args.task} "
                            f"--budget paper` prints what it runs; --budget cpu or tiny run here")
    out = Path(args.out or f"runs/reproduce/{args.task}")
    md = Path(args.results_md or ROOT / "docs" / "results" / f"{args.task}.md")
    json_path = Path(args.json or ROOT / "docs" / "results" / f"{args.task}.json")
    extra = {}
    for spec in args.arm:
        name, sep, overrides = spec.partition("=")
        if not sep or not overrides.strip():
            raise UserError(f"--arm {spec}: write NAME=OVERRIDES, e.g. --arm mgs_rank='trainer=mgs trainer.weighting=rank'")
        extra[name.strip()] = shlex.split(overrides)
    repro = Reproduction(args.task, args.budget, out, seeds=args.seeds, base=args.base, beams=args.beams, jobs=args.jobs,
                         progress=not args.no_progress, extra_arms=extra, only_arms=args.arms,
                         calibration_from=args.calibration_from, preload=args.preload)
    results = repro.run(until=args.until)
    if results is None:
        print(f"stopped after stage {args.until}; run the same command without --until to go on")
        return
    from mleps_lab.reproduce_report import write_report

    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    written = write_report(results, md, Path(args.img_dir), json_path, command)
    for line in results["verdict"]:
        print(line)
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()

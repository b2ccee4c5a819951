"""Compare update rules from one starting checkpoint at equal training wall time.

    python scripts/compare_rules.py --init runs/demo/checkpoints/warm_start --minutes 4 \
        --out runs/compare mle pg mgs mgs_scaled

Each named recipe (RECIPES below, or `name:override,override` on the command line) runs
`python -m mleps.train` from --init for --minutes of training time (trainer.max_train_s;
evaluation time excluded), evaluating every --eval-every steps on --eval-examples validation
sentences. Runs go two at a time with one torch thread each, so every rule sees the same
machine. Prints a table (start, end after the budget, best) and writes
compare.png and compare.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mleps.plotting import plot_run, read_events
from mleps_lab.reproduce import ARMS  # the rules as the reproduction runs them

ROOT = Path(__file__).resolve().parents[1]

# The reproduction's arms (mgs: the guide centred on AdamW's next step, applied directly), with MLE at a
# fine-tuning lr (the reproduction searches it), plus MGS with the scaled guides of the original code.
RECIPES = {
    **ARMS,
    "mle": [*ARMS["mle"], "trainer.lr=1e-4", "trainer.label_smoothing=0.0"],
    "mgs_scaled": [*ARMS["mgs"], "trainer.guide=scaled", "trainer.guide_scale=0.05", "trainer.apply=optimizer"],
    "mgs_original": [*ARMS["mgs"], "trainer.guide=scaled", "trainer.guide_scale=1.0", "trainer.apply=optimizer",
                     "trainer.density=mgs_reference"],
}


def run(name: str, overrides: list[str], args) -> Path:
    out = Path(args.out) / name
    # MLE steps are ~6x cheaper than sampling steps: evaluate it less often (evaluation time is not counted)
    eval_every = args.eval_every * (6 if overrides[0] == "trainer=mle" else 1)
    cmd = [sys.executable, "-m", "mleps.train", *overrides, f"init_from={args.init}",
           "trainer.warm_start_steps=0", "trainer.max_steps=100000", f"trainer.max_train_s={args.minutes * 60}",
           f"trainer.eval_every={eval_every}", "trainer.save_every=100000", "trainer.log_every=5",
           f"data.max_eval_examples={args.eval_examples}", f"seed={args.seed}", f"output_dir={out}",
           "overwrite=true", "progress=false", *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(Path(args.out) / f"{name}.log", "w") as log:
        print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "metrics.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="names from RECIPES, or name:key=value,key=value")
    parser.add_argument("--init", required=True, help="checkpoint folder to start every run from")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall time per run")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations (x6 for mle)")
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    jobs = {}
    for spec in args.recipes:
        name, _, extra = spec.partition(":")
        jobs[name] = RECIPES.get(name, ["trainer=" + name.split("_")[0]]) + [o for o in extra.split(",") if o]
    with ThreadPoolExecutor(args.parallel) as pool:
        files = dict(zip(jobs, pool.map(lambda kv: run(kv[0], kv[1], args), jobs.items())))

    curves = {name: read_events(path, "validation") for name, path in files.items()}
    rows = []
    for name, events in curves.items():
        steps = events[-1]["step"]
        rows.append({"rule": name, "start": events[0]["score"], "end": events[-1]["score"], "steps": steps,
                     "s_per_step": events[-1]["train_s"] / max(steps, 1),
                     "train_s": events[-1]["train_s"], "best": max(e["score"] for e in events),
                     "overrides": jobs[name]})
    metric = curves[next(iter(curves))][0].get("metric", "score")
    # Every run stops at the first step boundary past the budget, so `end` is the score after it.
    print(f"\nvalidation {metric}, {args.eval_examples} sentences, {args.minutes} min of training each "
          f"(evaluation time not counted)")
    print(f"{'rule':<14}{'steps':>6}{'s/step':>8}{'train min':>10}{'start':>8}{'end':>8}{'best':>8}")
    for r in rows:
        print(f"{r['rule']:<14}{r['steps']:>6}{r['s_per_step']:>8.2f}{r['train_s'] / 60:>10.2f}{r['start']:>8.2f}"
              f"{r['end']:>8.2f}{r['best']:>8.2f}")
    plot_run(None, Path(args.out) / "compare.png", runs=files)
    (Path(args.out) / "compare.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "overrides"} for r in rows]}))


if __name__ == "__main__":
    main()

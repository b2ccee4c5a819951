"""Step time of one process against several (accelerate launch), at the same global batch.

    python scripts/bench_processes.py --init runs/demo/checkpoints/warm_start
    python scripts/bench_processes.py --init ... --trainer pg --steps 8 --processes 2

For each layout, `python -m mleps.train` runs --steps steps from --init (a trained checkpoint:
an untrained model decodes max_new_tokens of garbage), and the time of steps 2..N is summed from
`step_s` in metrics.jsonl. Every layout trains on the same batches, whose decode lengths differ
a lot from step to step, so totals over the same steps compare where medians would not:
  1 process        batch B, with as many torch threads as processes in the other layouts
  N processes      batch B/N each, one thread each (mleps/conf/accelerate/cpu_2proc.yaml on CPU)
  population       the same, MGS only: each process decodes the whole batch under K/N samples
Every layout computes the same update (tests/test_distributed.py); only the time differs. The
last line is one JSON object with the ratios to the 1-process step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mleps.rundir import read_events

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, launcher: list[str], overrides: list[str], threads: int, out: Path) -> float:
    run_dir = out / name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(out / f"{name}.log", "w") as log:
        subprocess.run([*launcher, "-m", "mleps.train", *overrides, f"output_dir={run_dir}"], cwd=ROOT, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    step_s = [e["step_s"] for e in read_events(run_dir, "train")][1:]  # the first step warms caches
    return sum(step_s) / len(step_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint folder to start from")
    p.add_argument("--trainer", default="mgs")
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None, help="run dirs and logs (default: a temporary folder)")
    p.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = p.parse_args()
    n = args.processes
    if args.batch_size % n:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by --processes {n}")
    out = Path(args.out or tempfile.mkdtemp(prefix="mleps-bench-processes-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"trainer={args.trainer}", f"init_from={args.init}", "trainer.warm_start_steps=0",
              f"trainer.max_steps={args.steps}", "trainer.eval_every=100000", "trainer.save_every=100000",
              "trainer.log_every=1", "data.max_eval_examples=8", "progress=false", "cpu=true", "overwrite=true",
              *args.extra]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "mleps" / "conf" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", str(n)]
    layouts = {"1_process": ([sys.executable], [f"trainer.batch_size={args.batch_size}"], n),
               f"{n}_processes": (launch, [f"trainer.batch_size={args.batch_size // n}"], 1)}
    if args.trainer == "mgs":
        layouts[f"{n}_processes_population"] = (launch, [f"trainer.batch_size={args.batch_size // n}",
                                                         "trainer.parallel=population"], 1)
    times = {}
    for name, (launcher, batch, threads) in layouts.items():
        times[name] = run(name, launcher, [*common, *batch], threads, out)
        print(f"{name:<28} mean step {times[name]:.3f} s (steps 2..{args.steps})", flush=True)
    base = times["1_process"]
    result = {f"{k}_over_1_process": v / base for k, v in times.items() if k != "1_process"}
    result.update(step_s=times, trainer=args.trainer, global_batch=args.batch_size, processes=n,
                  steps=args.steps, cpu_count=os.cpu_count(), out=str(out))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Runs training scenarios in every process of one `accelerate launch`, for tests/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py OUT SPEC.json

SPEC.json maps a scenario name to {"overrides": [...], "inject": null | "diverge" | "nan" | "hang"}.
One launch runs them all (process start-up is most of a tiny run's cost). For each scenario
every process writes OUT/<name>/params-rank<r>.safetensors and result-rank<r>.json.

Injections (rank 1 only):
  diverge  after the first update, nudge one weight: the next evaluation must report it
  nan      step 1 returns a NaN loss on rank 1 alone: every process must skip it
  hang     rank 1 enters an all-reduce the others never join: it must fail, not wait forever
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mleps.config  # noqa: E402
import mleps.train  # noqa: E402,F401  (the run_dir resolver)
from mleps import distributed  # noqa: E402
from mleps.errors import UserError  # noqa: E402
from mleps.loop import Loop  # noqa: E402
from mleps.trainers.mle import MLE  # noqa: E402


def inject(kind: str | None, rank: int):
    """Patch MLE on rank 1; returns an undo function."""
    original_step, original_apply = MLE.step, MLE.apply
    if kind == "diverge" and rank == 1:
        def apply(self, optimizer):
            original_apply(self, optimizer)
            with torch.no_grad():
                next(self.unwrapped.parameters()).view(-1)[0] += 1e-3
        MLE.apply = apply
    if kind == "nan" and rank == 1:
        def step(self, batch, step, shard=None):
            stats = original_step(self, batch, step, shard)
            return dict(stats, loss=float("nan")) if step == 1 else stats
        MLE.step = step

    def undo():
        MLE.step, MLE.apply = original_step, original_apply
    return undo


def run(name: str, spec: dict, out: Path, rank: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "mleps" / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=spec["overrides"])
    undo = inject(spec.get("inject"), rank)
    loop = None
    try:
        loop = Loop(cfg, out / name)
        loop.setup()
        summary = loop.train()
        result = {"ok": True, "best_score": summary["best_score"], "state": loop.state.to_dict()}
    except UserError as e:
        result = {"ok": False, "error": str(e), "exit_code": e.exit_code}
    finally:
        undo()
    if loop is not None and hasattr(loop, "model"):
        model = loop.accelerator.unwrap_model(loop.model)
        save_file({k: v.detach().contiguous() for k, v in model.named_parameters()},
                  str(out / name / f"params-rank{rank}.safetensors"))
    return result


def hang(out: Path, rank: int, timeout_s: float) -> dict:
    """Rank 1 all-reduces alone; rank 0 stays alive past the timeout so the error is the timeout's."""
    (out / "hang").mkdir(parents=True, exist_ok=True)
    from accelerate import PartialState

    state = PartialState()
    t0 = time.perf_counter()
    if rank == 1:
        try:
            distributed.all_true(state, True)
            return {"ok": True, "waited_s": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 (what the test looks at is the kind and the time)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "waited_s": time.perf_counter() - t0}
    time.sleep(timeout_s + 10)
    return {"ok": True, "waited_s": time.perf_counter() - t0}


def main() -> None:
    out, spec_path = Path(sys.argv[1]), Path(sys.argv[2])
    specs = json.loads(spec_path.read_text())
    mleps.config.register_configs()
    rank = int(__import__("os").environ.get("RANK", "0"))
    for name, spec in specs.items():
        try:
            if spec.get("inject") == "hang":
                result = hang(out, rank, spec["timeout_s"])
            else:
                result = run(name, spec, out, rank)
        except Exception:  # noqa: BLE001 (recorded for the test to show)
            result = {"ok": False, "error": traceback.format_exc()}
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()

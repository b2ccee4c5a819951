"""python -m mleps.train [group=option ...] [key=value ...]

With no overrides: an MLE warm start of tiny_marian on Multi30k de->en, then MLE-guided
parameter search on corpus BLEU. Prints validation scores at each phase's start and end and
writes metrics.jsonl, checkpoints/{last,best,warm_start} and validation.png in the run dir.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mleps.config import CONF_DIR, conf_dir, register_configs
from mleps.errors import UserError, exit_on_user_error, run_hydra

log = logging.getLogger("mleps")
register_configs()


def _run_dir(output_dir, resume, default):
    """output_dir if set, else the run dir named by resume=PATH, else Hydra's dated folder."""
    from mleps.rundir import holds_run, resume_path

    if output_dir:
        return output_dir
    path = resume_path(resume)
    if path is None:
        return default
    if not holds_run(Path(path).absolute()):  # checked before Hydra creates the folder
        raise UserError(f"resume={path}: no run there (no metrics.jsonl or checkpoints/): check the path")
    return path


OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


def summary_table(summary: dict, metric: str) -> str:
    width = max(14, len(metric) + 7)  # a column holds "start <metric>" with room to spare
    lines = [f"{'phase':<12}{'trainer':<9}{'steps':>7}{'start ' + metric:>{width}}{'end ' + metric:>{width}}"]
    for p in summary["phases"]:
        fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        lines.append(f"{p['phase']:<12}{p['trainer']:<9}{p['steps']:>7}{fmt(p['start_score']):>{width}}"
                     f"{fmt(p['end_score']):>{width}}")
        if p.get("early_stop_step") is not None:
            lines.append(f"{'':<12}early stop at step {p['early_stop_step']} (trainer.patience); best: checkpoints/best")
    return "\n".join(lines)


def override_keys(overrides) -> set[str]:
    """The keys a list of "key=value" overrides sets (`+key`, `~key`: the key)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def skip_warm_start_for_given_model(cfg, given_model: bool, asked: set[str]) -> None:
    """A given model, a checkpoint (init_from) or a model object (mleps.api), is fine-tuned as it is: the
    rule's MLE warm start (trainer=mgs's default, for runs from scratch) would first retrain it with MLE.
    It stays when the user sets trainer.warm_start_steps (`asked`: the keys the user's overrides set)."""
    if not (given_model or cfg.init_from) or not cfg.trainer.warm_start_steps or "trainer.warm_start_steps" in asked:
        return
    log.info("%s: no MLE warm start (trainer.warm_start_steps=%d is for runs from scratch; set it explicitly "
             "to have one)", f"init_from={cfg.init_from}" if cfg.init_from else "a given model",
             cfg.trainer.warm_start_steps)
    cfg.trainer.warm_start_steps = 0


def run(cfg, run_dir: Path, callbacks=(), asked=(), **inputs) -> dict:
    """One training run of a composed config into `run_dir`: what the CLI and mleps.api.Trainer share.
    `asked`: the keys the user set (the command line's, the API's `config`); `inputs`: Python objects that
    replace what the config would load (mleps.loop.Loop). Prints the summary table and writes summary.json
    on the main process."""
    from mleps.loop import Loop
    from mleps.plotting import plot_run

    skip_warm_start_for_given_model(cfg, "model" in inputs, set(asked))
    loop = Loop(cfg, run_dir, callbacks, **inputs)
    loop.setup()
    summary = loop.train()
    if loop.is_main:
        plot = plot_run(run_dir / "metrics.jsonl", run_dir / "validation.png")
        print(f"\nvalidation {loop.eval_metric.name} ({len(loop.val_ds or [])} sentences)")
        print(summary_table(summary, loop.eval_metric.name))
        print(f"run dir: {run_dir}" + (f"   plot: {plot}" if plot else ""))
        print(json.dumps(summary))
        # A finished run says so: drivers (scripts/reproduce.py) skip runs that have it and resume the others.
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(run_dir / "summary.json")
    return summary


def run_from_command_line(cfg, callbacks=()) -> dict:
    """The CLI's body (mleps_lab.train calls it with its callbacks): the command line's own rule (one run dir
    for several processes), then `run` in Hydra's run dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.output_dir and _run_dir(None, cfg.resume, None) is None:
        # Hydra's dated folder is named by each process's own clock: they could write to two.
        raise UserError("several processes need one run dir: pass output_dir=PATH")
    return run(cfg, Path(HydraConfig.get().runtime.output_dir), callbacks,
               asked=override_keys(HydraConfig.get().overrides.task))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_user_error
def train(cfg) -> None:
    run_from_command_line(cfg)


def main() -> None:
    register_configs()  # again: a process may have registered other schemas since the import (mleps_lab.train)
    exit_on_user_error(conf_dir)("train")
    run_hydra(train)


if __name__ == "__main__":
    main()

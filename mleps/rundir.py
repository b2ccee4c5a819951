"""The run dir: one run per folder, its config kept beside it, nothing lost on overwrite.

Two steps, both on the main process only:
  check_run_dir   reads, never writes: is this a new run, a resume (of the same config), or a
                  refusal? Called after every input was validated and loaded.
  prepare_run_dir writes: a resumed run's metrics.jsonl is cut back to its checkpoint; an
                  overwritten run is moved aside into `.previous-run/` (not deleted) and the
                  resolved config is written to config.yaml.
The previous run is deleted only once the new run has saved checkpoints/last, and moved back
if the new run fails before that (`restore_previous_run`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from mleps.checkpoint import STATE_FILE, find_complete
from mleps.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the run's resolved config; a resume must match it
PREVIOUS = ".previous-run"
# tensorboard/: where tensorboard=true wrote before trackers/ (older runs are still moved aside whole)
RUN_FILES = ("checkpoints", "metrics.jsonl", CONFIG_FILE, "summary.json", "validation.png", "trackers", "tensorboard")
REPORTING = ("progress", "tensorboard", "trackers", "tracker_project")
# Keys a resumed run may change: how long it runs and how it reports, not what it trains.
RESUMABLE = ("resume", "overwrite", "output_dir", "data_dir", "cache_dir", "cpu", *REPORTING,
             "collective_timeout_s", "decode.batch_size", "trainer.max_steps", "trainer.eval_every",
             "trainer.save_every", "trainer.log_every", "trainer.max_train_s", "trainer.patience",
             "trainer.max_bad_steps", "trainer.warm_start_eval_every")


def read_events(path, split: str | None = None) -> list[dict]:
    """The events of a run's metrics.jsonl (`path`: the file or its run dir; none when it is missing).
    With `split`: that split's logged steps and evaluations only, without marker events (early_stop)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return events if split is None else [e for e in events if e.get("split") == split and "event" not in e]


def resume_path(resume) -> str | None:
    """The run dir named by resume=PATH, or None for resume=true/false."""
    if isinstance(resume, str) and resume.lower() not in ("true", "false", ""):
        return resume
    return None


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()


def check_run_dir(cfg, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: a new run). Raises UserError; writes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a folder: pass output_dir=A_FOLDER")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {run_dir} is not writable: pass a folder you can write to")
    existing = run_dir.is_dir() and holds_run(run_dir)
    if not cfg.resume:
        if existing and not cfg.overwrite:
            raise UserError(f"{run_dir} already holds a run: pass resume=true to continue it or overwrite=true "
                            f"to replace it (the old run is kept until the new one saves a checkpoint)")
        return None
    if not existing:
        if resume_path(cfg.resume):  # a path that holds no run is a typo, not a new run
            raise UserError(f"resume={cfg.resume}: no run there (no metrics.jsonl or checkpoints/): check the path")
        log.info("resume: no checkpoint in %s yet, starting fresh", run_dir)
        return None
    last = find_complete(run_dir / "checkpoints" / "last")
    _check_same_config(cfg, run_dir)
    if last is None:  # stopped before its first save: step 0 is its last checkpoint
        log.warning("resume: %s has no complete checkpoints/last yet; starting it again from step 0", run_dir)
        return None
    read_state(last)  # a garbled trainer_state.json fails here, before anything is changed
    return last


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume: {path} is unreadable ({type(e).__name__}); the run cannot continue from "
                        f"it: start a new run in another output_dir (init_from={checkpoint.parent / 'best'} "
                        f"if that one is intact)") from None
    return state


def flat_config(cfg) -> dict:
    """Dotted keys -> values of the resolved config (lists kept whole)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg, "")
    return out


def _check_same_config(cfg, run_dir: Path) -> None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():  # a run made before config.yaml was kept
        log.warning("resume: %s has no %s: cannot check the config is the run's own", run_dir, CONFIG_FILE)
        return
    try:
        saved = flat_config(OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001  (yaml and OmegaConf raise several types)
        raise UserError(f"cannot resume: {path} is unreadable ({type(e).__name__})") from None
    now = flat_config(cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE and saved.get(k) != now.get(k)
               and not (k not in saved and now[k] == _schema_default(cfg, k))]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(f"resume: the config differs from the run's ({path}): {shown}{more}; a resumed run may only "
                        f"change {', '.join(k for k in RESUMABLE if '.' in k or k in REPORTING)}: "
                        f"start a new run in another output_dir instead")


def _schema_default(cfg, key: str):
    """The schema's default of a dotted key. A key a run's config.yaml lacks was added to mleps after the run
    was made; at its default it does what the run did without it, so it is no difference."""
    *parents, leaf = key.split(".")
    node = cfg
    for name in parents:
        node = node[name]
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    if leaf not in fields:
        return _NO_DEFAULT
    f = fields[leaf]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT if f.default is dataclasses.MISSING else f.default


_NO_DEFAULT = object()


def prepare_run_dir(cfg, run_dir: Path, resume_from: Path | None) -> None:
    """After check_run_dir: make the folder ready for this run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it for the CLI; not for Loop used as a library
        if resume_from is not None:
            # Events logged after the checkpoint by the run that stopped are logged again by this one.
            _truncate_metrics(run_dir / "metrics.jsonl", read_state(resume_from)["step"])
            (run_dir / "summary.json").unlink(missing_ok=True)  # written again when this run finishes
        elif holds_run(run_dir):
            if cfg.overwrite:
                _move_aside(run_dir)
            else:  # resume=true of a run stopped before its first save: start it again
                for name in RUN_FILES:
                    _remove(run_dir / name)
        tmp = run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tmp.replace(run_dir / CONFIG_FILE)
    except OSError as e:
        raise UserError(f"cannot write into {run_dir}: {e.strerror or e}: pass an output_dir you can write to") from None


def _move_aside(run_dir: Path) -> None:
    previous = run_dir / PREVIOUS
    if previous.exists():  # an earlier overwrite never saved: the run to keep is still in there
        for name in RUN_FILES:
            _remove(run_dir / name)
        return
    previous.mkdir()
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, previous / name)
    log.info("overwrite: the previous run is in %s until this one saves checkpoints/last", previous)


def drop_previous_run(run_dir: Path) -> None:
    """The new run has a checkpoint: the overwritten one goes."""
    shutil.rmtree(run_dir / PREVIOUS, ignore_errors=True)


def restore_previous_run(run_dir: Path) -> bool:
    """The new run failed before its first checkpoint: put the overwritten run back."""
    previous = run_dir / PREVIOUS
    if not previous.is_dir():
        return False
    for name in RUN_FILES:
        _remove(run_dir / name)
        if (previous / name).exists():
            os.replace(previous / name, run_dir / name)
    shutil.rmtree(previous, ignore_errors=True)
    log.warning("the previous run in %s was put back", run_dir)
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
        keep.append(line)
    if len(keep) < len(lines):
        path.write_text("".join(keep))

"""The run dir: one run per folder, one writer at a time, its config kept beside it, nothing lost.

Two steps, both on the main process only:
  check_run_dir   reads, never writes: is this a new run, a resume (of the same config), or a
                  refusal? Called after every input was validated and loaded; a resume's files
                  (trainer_state.json, optimizer.pt, scheduler.pt, rng.pt) are read here too.
  prepare_run_dir writes: takes the run dir's lock (`.mleps.lock`: holder pid and host), then a
                  resumed run's metrics.jsonl is cut back to its checkpoint; an overwritten run (or
                  a run restarted from step 0) is moved aside into `.previous-run/` (not deleted),
                  Hydra's .hydra/ and the resolved config are written, and the run's log file opens.
The previous run is deleted only once the new run has saved checkpoints/last, and moved back
if the new run fails before that (`restore_previous_run`). Resume never deletes checkpoints or
metrics.jsonl: a run dir without a complete checkpoints/last is refused, naming what is missing,
unless it holds no checkpoint and no logged event yet.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mleps.checkpoint import STATE_FILE, find_complete, read_train_state
from mleps.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the run's resolved config; a resume must match it
PREVIOUS = ".previous-run"
# tensorboard/: where tensorboard=true wrote before trackers/ (older runs are still moved aside whole)
# .hydra/: Hydra's record of the command line (written by prepare_run_dir, not by Hydra at start)
RUN_FILES = ("checkpoints", "metrics.jsonl", CONFIG_FILE, "summary.json", "validation.png", "trackers", "tensorboard",
             ".hydra")
LOCK_FILE = ".mleps.lock"  # the run dir's one writer: {"pid", "host", "started", ...}
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")  # beside trainer_state.json in checkpoints/last
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


def check_run_dir(cfg, run_dir: Path, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from (None: a new run). Raises UserError; writes nothing.
    quiet: no log lines (prepare_run_dir checks again under the lock)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a folder: pass output_dir=A_FOLDER")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {run_dir} is not writable: pass a folder you can write to")
    check_lock(run_dir)
    existing = run_dir.is_dir() and holds_run(run_dir)
    if not cfg.resume:
        if existing and not cfg.overwrite:
            raise UserError(f"{run_dir} already holds a run: pass resume=true to continue it or overwrite=true "
                            f"to replace it (the old run is kept until the new one saves a checkpoint)")
        return None
    if not existing:
        if resume_path(cfg.resume):  # a path that holds no run is a typo, not a new run
            raise UserError(f"resume={cfg.resume}: no run there (no metrics.jsonl or checkpoints/): check the path")
        if not quiet:
            log.info("resume: no checkpoint in %s yet, starting fresh", run_dir)
        return None
    _check_same_config(cfg, run_dir)
    last = find_complete(run_dir / "checkpoints" / "last")
    if last is None:
        _check_restart(cfg, run_dir)
        if not quiet:
            log.warning("resume: %s holds no checkpoint and no logged step yet; starting it from step 0", run_dir)
        return None
    read_train_state(last)  # a garbled trainer_state.json fails here, before anything is changed
    check_resume_files(last)
    return last


def _check_restart(cfg, run_dir: Path) -> None:
    """resume=true without a complete checkpoints/last. Resume never deletes a checkpoint or metrics.jsonl,
    and continuing from another checkpoint (best has no optimizer state) would not be the same run: unless
    the run dir holds nothing of the run yet, it is refused, naming what is missing and what is there."""
    ckpts = run_dir / "checkpoints"
    last = ckpts / "last"
    again = ("pass overwrite=true to start the run again from step 0 (the old run is kept until the new one saves "
             "checkpoints/last)")
    if last.exists():
        missing = [name for name in (STATE_FILE, *RESUME_FILES) if not (last / name).is_file()]
        raise UserError(f"cannot resume: {last} is incomplete (missing {', '.join(missing)}); nothing was changed: "
                        f"{again}, or restore the missing files")
    held = []
    for folder in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        found = None if folder.name.startswith(".") else find_complete(folder)
        if found is not None:
            held.append(f"checkpoints/{found.name} (step {read_train_state(found).step})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text(errors="replace").strip():
        held.append("metrics.jsonl")
    if held:
        best = find_complete(ckpts / "best")
        raise UserError(f"cannot resume: {run_dir} has no checkpoints/last (a run stopped before its first save of "
                        f"it, every trainer.save_every={cfg.trainer.save_every} steps, or it was removed) but holds {', '.join(held)}; "
                        f"nothing was changed: {again}"
                        + (f", or init_from={best} with another output_dir" if best else ""))


def check_resume_files(checkpoint: Path) -> None:
    """optimizer.pt, scheduler.pt and rng.pt present and tensors-only: a refusal after the run dir was changed
    would leave a config.yaml that the resumed run never ran with. Read mapped (tensors are not loaded)."""
    import torch

    for name in RESUME_FILES:
        path = checkpoint / name
        try:
            torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001  (missing, truncated, or not tensors-only: weights_only refuses pickles)
            raise UserError(f"cannot resume: {path} is missing or unreadable ({type(e).__name__}); nothing was "
                            f"changed: resume from an intact copy of the run, or start a new run in another "
                            f"output_dir (init_from={checkpoint.parent / 'best'} if that one is intact)") from None


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
               and not (k not in saved and now[k] == _schema_default(cfg, k))
               # runs saved when every task loss's options shared one metric node kept the other losses' keys:
               # an option the run's own task loss does not have cannot have changed what it computed
               and not (k.startswith("metric.") and k not in now)]
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
    """After check_run_dir: take the run dir's lock and make the folder ready for this run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it for the CLI; not for Loop used as a library
        acquire_lock(run_dir)
    except OSError as e:
        raise UserError(f"cannot write into {run_dir}: {e.strerror or e}: pass an output_dir you can write to") from None
    try:
        # Checked again under the lock: another run may have written here since check_run_dir read the folder.
        if check_run_dir(cfg, run_dir, quiet=True) != resume_from:
            raise UserError(f"{run_dir} changed while this run was starting (another run wrote into it): "
                            f"run the command again")
        fresh = not holds_run(run_dir)
        if resume_from is not None:
            # Events logged after the checkpoint by the run that stopped are logged again by this one.
            _truncate_metrics(run_dir / "metrics.jsonl", read_train_state(resume_from).step)
            (run_dir / "summary.json").unlink(missing_ok=True)  # written again when this run finishes
        elif not fresh:  # overwrite=true, or resume=true of a run that holds nothing yet: kept aside
            _move_aside(run_dir)
        _write_hydra_record(cfg, run_dir)
        tmp = run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tmp.replace(run_dir / CONFIG_FILE)
        _FRESH[run_dir.absolute()] = fresh
    except BaseException as e:
        release_lock(run_dir)
        if isinstance(e, OSError):
            raise UserError(f"cannot write into {run_dir}: {e.strerror or e}: pass an output_dir you can write to") from None
        raise


_FRESH: dict[Path, bool] = {}  # run dirs this process prepared: did they hold a run before?


def run_dir_ready(run_dir: Path) -> None:
    """Every process, once prepare_run_dir succeeded: the run's log file opens (mleps.runlog)."""
    from mleps.runlog import open_run_logs

    open_run_logs(run_dir)


def _write_hydra_record(cfg, run_dir: Path) -> None:
    """Hydra's .hydra/{config,hydra,overrides}.yaml, which Hydra itself would write before the task starts
    (hydra.output_subdir is null in mleps/conf/train.yaml): only a run that passed every check writes them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", OmegaConf.create(list(hydra_cfg.overrides.task)))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(OmegaConf.to_yaml(node))
        tmp.replace(folder / name)


# -- the lock: one writer per run dir --------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux): a pid reused by another process differs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by an unknown process


def _holder_state(holder: dict) -> str:
    """ours | stale (its process is gone) | live | unknown (another host, or no pid)."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return "unknown"
    if pid == os.getpid():  # an earlier run in this process that stopped without letting go
        return "ours"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "stale"
    except PermissionError:
        pass
    started = holder.get("started")
    if started is not None and _process_start(pid) not in (None, started):
        return "stale"  # the pid now belongs to another process
    return "live"


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def check_lock(run_dir: Path) -> None:
    """Refuse a run dir held by another running process (reads only; prepare_run_dir takes the lock)."""
    path = run_dir / LOCK_FILE
    holder = _read_lock(path)
    if holder is None:
        return
    state = _holder_state(holder)
    if state == "live":
        raise UserError(f"{run_dir} is in use by another run ({_describe(holder)}): one run dir has one writer: "
                        f"wait for it to finish, or pass another output_dir")
    if state == "unknown":
        raise UserError(f"{run_dir} is locked by {_describe(holder)}, which cannot be checked from "
                        f"{socket.gethostname()}: if that run is no longer running, delete {path} and run again; "
                        f"otherwise pass another output_dir")


def acquire_lock(run_dir: Path) -> None:
    """Create `.mleps.lock` (pid, host) or fail naming its holder. Only the main process of a launch takes it
    (prepare_run_dir runs there), so the processes of one `accelerate launch` share it. A lock whose process
    is gone (killed with SIGKILL, a power cut) is taken over, with a warning naming it."""
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
          "since": time.time(), "command": " ".join(sys.argv)[:500]}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:  # released in between
                continue
            state = _holder_state(holder)
            if state not in ("stale", "ours"):
                check_lock(run_dir)  # raises, naming the holder
                continue
            if state == "stale":
                log.warning("%s: taking over a stale lock (%s, no longer running)", run_dir, _describe(holder))
            aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.replace(path, aside)  # one process wins the takeover; the others find the winner's lock
            except FileNotFoundError:
                continue
            if _read_lock(aside) != holder:  # moved a fresh lock taken in between: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD.add(path.absolute())
        return
    raise UserError(f"could not take the lock {path} (other runs keep taking it): pass another output_dir")


_HELD: set[Path] = set()


def release_lock(run_dir: Path) -> None:
    path = (run_dir / LOCK_FILE).absolute()
    if path in _HELD:
        _HELD.discard(path)
        holder = _read_lock(path)
        if holder is not None and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:  # a run that stopped without reaching Loop.train's end (an error during setup)
    for path in list(_HELD):
        release_lock(path.parent)


def _move_aside(run_dir: Path) -> None:
    previous = run_dir / PREVIOUS
    if previous.exists() and find_complete(run_dir / "checkpoints" / "last") is not None:
        shutil.rmtree(previous)  # killed after its save and before dropping it: the old run is no longer needed
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
    """The new run failed before its first checkpoint: put the overwritten run back. A run that failed
    before it wrote anything of its own into a fresh folder takes back what prepare_run_dir wrote."""
    previous = run_dir / PREVIOUS
    if not previous.is_dir():
        if _FRESH.get(run_dir.absolute()) and not holds_run(run_dir):
            for name in (CONFIG_FILE, ".hydra"):
                _remove(run_dir / name)
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

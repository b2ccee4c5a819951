"""Atomic checkpoints that plain transformers can load, plus the state to resume exactly.

A checkpoint folder holds `save_pretrained` output (config.json, model.safetensors, the
tokenizer; a LoRA run's base model, with its adapter in adapter/: mleps.adapters), `mleps.json` (source prefix, provenance) and, for resuming, `trainer_state.json`
(written last: its presence marks a complete folder), `optimizer.pt`/`scheduler.pt`
(tensors only, read with `weights_only=True`) and `rng.pt` (likewise). Nothing is ever unpickled.

`trainer_state.json` holds a `TrainState`: the loop's counters and scores, written and read here only.
It carries a version; a file without one (version 0, written before the field existed) has the
same keys and is read as is, so runs saved then still resume.

Saving writes a temporary sibling folder (`.NAME.tmp-PID`), flushes it to disk, then renames:
the old folder is moved aside (`.NAME.old`), the new one moved in, and only then is the old
one deleted. A kill at any moment leaves either the new folder or the old one, possibly
under its `.old` name, which `find_complete` finds and puts back. A save that fails (disk
full, permissions) leaves the old folder untouched and raises a one-line UserError.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from mleps import adapters
from mleps.errors import UserError
from mleps.models import MLEPS_META

STATE_FILE = "trainer_state.json"
_TEST_SAVE_DELAY = "MLEPS_TEST_SAVE_DELAY_S"  # tests kill the process while a save is in progress
TRAIN_STATE_VERSION = 1  # raise it when a field changes meaning; from_dict then reads the older versions


@dataclass
class TrainState:
    """The loop's state beside the weights, optimizer, scheduler and RNG: what a resumed run needs to be
    the same run. Steps are global (the warm start and the main phase count on one clock)."""

    step: int = 0  # updates done (skipped non-finite steps included)
    best_score: float | None = None  # the best selected validation number (eval.select) so far
    best_step: int | None = None  # the step of checkpoints/best
    elapsed_s: float = 0.0  # wall time over all the run's processes' lives
    train_s: float = 0.0  # time in training steps (trainer.max_train_s counts this)
    bad_steps_total: int = 0  # non-finite steps skipped
    bad_steps_in_a_row: int = 0  # trainer.max_bad_steps stops the run when this reaches it
    phase: str | None = None  # the phase that was running (warm_start | main)
    phase_first_steps: dict[str, int] = field(default_factory=dict)  # where each started phase began
    evals_without_improvement: int = 0  # within the running phase (trainer.patience)
    last_eval_step: int | None = None
    last_score: float | None = None
    phase_start_scores: dict[str, float | None] = field(default_factory=dict)
    phase_end_scores: dict[str, float | None] = field(default_factory=dict)
    early_stopped: dict[str, int] = field(default_factory=dict)  # phase -> the step patience stopped it at
    version: int = TRAIN_STATE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "TrainState":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict, source: str = STATE_FILE) -> "TrainState":
        """A state as written by any version up to TRAIN_STATE_VERSION (version 0 has no version key)."""
        version = raw.get("version", 0)
        if version not in range(TRAIN_STATE_VERSION + 1) or isinstance(version, bool):
            raise UserError(f"{source} has version {version!r}, which this mleps does not read (it reads 0 to "
                            f"{TRAIN_STATE_VERSION}): resume with the mleps that wrote it, or start a new run "
                            f"in another output_dir")
        known = {f.name for f in fields(cls)} - {"version"}
        return cls(**{k: v for k, v in raw.items() if k in known})


def read_train_state(checkpoint: Path) -> TrainState:
    """checkpoint/trainer_state.json as a TrainState; a garbled file or an unknown version is a UserError."""
    path = Path(checkpoint) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        int(raw["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume: {path} is unreadable ({type(e).__name__}); the run cannot continue from "
                        f"it: start a new run in another output_dir (init_from={path.parent.parent / 'best'} "
                        f"if that one is intact)") from None
    return TrainState.from_dict(raw, f"cannot resume: {path}")


def save_checkpoint(folder: Path, model, tokenizer, meta: dict, state: TrainState | dict | None = None,
                    optimizer=None, scheduler=None, state_dict: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """state_dict / optimizer_state: the model's and the optimizer's full states when `model` and
    `optimizer` hold only this process's shard (FSDP, gathered by the caller); None: their own."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by saves that were killed
            if _stale_temporary(stale):  # never another live process's save in progress
                shutil.rmtree(stale, ignore_errors=True)
        if adapters.is_adapted(model):  # the base's files and adapter/
            adapters.save(model, tmp, state_dict)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / MLEPS_META).write_text(json.dumps(meta, indent=2))
        if optimizer is not None:
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if state is not None:
            torch.save(_rng_state(), tmp / "rng.pt")
        if os.environ.get(_TEST_SAVE_DELAY):
            time.sleep(float(os.environ[_TEST_SAVE_DELAY]))
        # Written last: a folder without it is incomplete.
        if isinstance(state, TrainState):
            state = state.to_dict()
        (tmp / STATE_FILE).write_text(json.dumps(state or {}, indent=2))
        _fsync_tree(tmp)  # the rename below must not reach the disk before the files do
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors report I/O errors in their own types
        shutil.rmtree(tmp, ignore_errors=True)
        find_complete(folder)  # put the old folder back if it was already moved aside
        raise UserError(f"could not write checkpoint {folder}: {write_error(e, folder.parent)} "
                        f"(the previous checkpoint is kept)") from None
    except BaseException:  # KeyboardInterrupt etc.: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _stale_temporary(path: Path) -> bool:
    """A `.NAME.tmp-PID` folder of this process or of a process that is gone."""
    try:
        pid = int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:
        return False
    return False


def write_error(e: BaseException, where: Path) -> str:
    """A short reason for a failed write. torch says "[enforce fail at inline_container.cc...] ...
    file write failed" and safetensors "IoError(Os { code: 28, ... })" for a full disk."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    if "No space left" in text or "StorageFull" in text or "code: 28" in text:
        return "No space left on device"
    try:
        if shutil.disk_usage(where).free < 64 * 2**20:  # torch does not say why a write failed
            return "No space left on device"
    except OSError:
        pass
    text = text.split("] . ", 1)[-1] if text.startswith("[enforce fail") else text  # torch's C++ location
    return (text.splitlines() or [type(e).__name__])[0][:200]


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_complete(folder: Path) -> Path | None:
    """The folder if complete; else, if a save was killed between its two renames, the previous
    folder (`.NAME.old`), which is moved back to its name first."""
    folder = Path(folder)
    old = folder.parent / f".{folder.name}.old"
    if (folder / STATE_FILE).is_file():
        return folder
    if (old / STATE_FILE).is_file():
        if not folder.exists():
            os.replace(old, folder)
            return folder
        return old
    return None


def load_training_state(folder: Path, optimizer=None, scheduler=None, load_optimizer_state=None) -> dict:
    """Restore optimizer, scheduler and RNG states; return the trainer state dict.
    load_optimizer_state: how the optimizer takes the saved state (FSDP: every process keeps its
    shard, mleps.distributed); None: optimizer.load_state_dict.

    Every file is required: resuming without one would silently not be the same run."""
    def fail(path, e):
        raise UserError(f"cannot resume: {path} is missing or unreadable ({type(e).__name__}): resume from an "
                        f"intact copy of the run, or start a new run in another output_dir") from None

    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(path, e)
    loaders = (("optimizer.pt", None if optimizer is None else load_optimizer_state or optimizer.load_state_dict),
               ("scheduler.pt", None if scheduler is None else scheduler.load_state_dict))
    for name, load in loaders:
        if load is not None:
            path = folder / name
            try:
                load(torch.load(path, weights_only=True))
            except Exception as e:  # missing, truncated, or not tensors-only (weights_only refuses pickles)
                fail(path, e)
    path = folder / "rng.pt"
    try:
        _set_rng_state(torch.load(path, weights_only=True))
    except Exception as e:
        fail(path, e)
    return state


def _rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when present) generator states, as tensors and numbers."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python_version": version, "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": float("nan") if gauss_next is None else gauss_next,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(s: dict) -> None:
    gauss = s.get("python_gauss", float("nan"))
    random.setstate((s["python_version"], tuple(int(x) for x in s["python_state"]), None if gauss != gauss else gauss))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]),
                         int(s.get("numpy_has_gauss", 0)), float(s.get("numpy_gauss", 0.0))))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

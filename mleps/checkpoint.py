"""Atomic checkpoints that plain transformers can load, plus the state to resume exactly.

A checkpoint folder holds `save_pretrained` output (config.json, model.safetensors, the
tokenizer), `mleps.json` (source prefix, provenance) and, for resuming, `trainer_state.json`
(written last: its presence marks a complete folder), `optimizer.pt`/`scheduler.pt`
(tensors only, read with `weights_only=True`) and `rng.pt`. Nothing is ever unpickled.

Saving writes a temporary sibling folder, then renames: the old folder is moved aside, the
new one moved in, and only then is the old one deleted. A kill at any moment leaves either
the new folder, or the old one (possibly under its `.old` name, which `find_complete` reads).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mleps.errors import UserError
from mleps.models import MLEPS_META

STATE_FILE = "trainer_state.json"
_TEST_SAVE_DELAY = "MLEPS_TEST_SAVE_DELAY_S"  # tests kill the process while a save is in progress


def save_checkpoint(folder: Path, model, tokenizer, meta: dict, state: dict | None = None,
                    optimizer=None, scheduler=None) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MLEPS_META).write_text(json.dumps(meta, indent=2))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if state is not None:
            torch.save(_rng_state(), tmp / "rng.pt")
        if os.environ.get(_TEST_SAVE_DELAY):
            time.sleep(float(os.environ[_TEST_SAVE_DELAY]))
        # Written last: a folder without it is incomplete.
        (tmp / STATE_FILE).write_text(json.dumps(state or {}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def find_complete(folder: Path) -> Path | None:
    """The folder if complete, else its `.old` predecessor left by a save that was killed."""
    folder = Path(folder)
    for candidate in (folder, folder.parent / f".{folder.name}.old"):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_training_state(folder: Path, optimizer=None, scheduler=None) -> dict:
    """Restore optimizer, scheduler and RNG states; return the trainer state dict."""
    state = json.loads((folder / STATE_FILE).read_text())
    for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if obj is not None:
            path = folder / name
            if not path.is_file():
                raise UserError(f"cannot resume: {path} is missing; start again with overwrite=true")
            obj.load_state_dict(torch.load(path, weights_only=True))
    rng_file = folder / "rng.pt"
    try:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    except Exception as e:
        raise UserError(f"cannot resume: RNG state {rng_file} is missing or unreadable ({type(e).__name__}); "
                        f"start again with overwrite=true") from None
    return state


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python_version": py[0], "python_state": torch.tensor(py[1], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": np_state[2],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python_version"], tuple(int(x) for x in s["python_state"]), None))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(s["torch"])

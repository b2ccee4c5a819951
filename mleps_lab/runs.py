"""What the lab's drivers and their reports share: the repo root, how a command is shown, atomic JSON
writes, and a training step's time without the lab's own measurements."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown(argv: list[str]) -> str:
    """The command as a person would type it (relative to the repo root when it can)."""
    def rel(s: str) -> str:
        return s.replace(str(ROOT) + os.sep, "")
    return "python -m " + " ".join(rel(a) for a in argv)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def training_step_s(event: dict) -> float:
    """A training event's step time without the held-out diagnostic (trainer.diagnose_every), which is not training."""
    return event["step_s"] - event.get("diagnose_s", 0.0)

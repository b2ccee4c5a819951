"""mleps: train Hugging Face models on the task loss they are judged by (MLE, MGS, PG, MRT).

    from mleps import Trainer                      # the Python API (mleps.api)
    python -m mleps.train ...                      # the same loop from the command line

The names below are imported when first used, so `import mleps.data` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "mleps.api", "compose_config": "mleps.api",
    "TrainConfig": "mleps.config",
    "TaskLoss": "mleps.task_loss", "register_task_loss": "mleps.task_loss",
    "build_task_loss": "mleps.losses", "UpdateRule": "mleps.trainers.base", "register_rule": "mleps.trainers.base",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mleps' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

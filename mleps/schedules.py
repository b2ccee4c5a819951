"""Learning-rate schedules: a multiplier of the base LR at each phase-local step.

The formulas are the ones every run so far was trained with (README and docs numbers): a
linear warmup from 1/warmup_steps (not from 0) to 1, then constant, linear decay to 0,
inverse square root, or a half cosine. transformers.get_scheduler has the same shapes but
starts its warmup at 0 and its inverse_sqrt differs without warmup, so it would change
every result by a step; these stay hand-written on purpose.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "inverse_sqrt", "cosine")


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    warmup = max(warmup_steps, 0)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / max(step, 1)) if warmup else 1 / math.sqrt(max(step, 1))
        progress = (step - warmup) / max(max_steps - warmup, 1)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine (mleps.validate checked the name)

    return f


def build_scheduler(optimizer, tcfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, tcfg.max_steps))

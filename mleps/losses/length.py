"""Length ratio to the closest reference, or its distance from a target ratio."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mleps.losses.units import UnitOptions, _check_unit, _units
from mleps.task_loss import TaskLoss, register_task_loss


@dataclass
class LengthOptions(UnitOptions):
    target: float = 1.0  # length: the ratio len(hyp)/len(ref) aimed at, e.g. 0.7 for outputs 30 % shorter


@register_task_loss
class LengthRatio(TaskLoss):
    """|len(hyp)/len(ref) - target| with the closest reference's length; corpus level pools the lengths.
    A target other than 1 is a control task: token cross-entropy pulls towards the references' lengths,
    so only a rule that reads this loss can move the outputs to the target (docs/mgs.md)."""

    name, options = "length", LengthOptions

    def __init__(self, level: str = "corpus", unit: str = "word", target: float = 1.0):
        super().__init__(level)
        self.unit = _check_unit(unit)
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"length target {target!r} must be a finite ratio > 0 (e.g. metric.target=0.7)")
        self.target = float(target)

    def _lengths(self, decoded) -> list[tuple[int, int]]:
        out = []
        for hyp, refs in zip(decoded.texts, decoded.references):
            h = len(_units(hyp, self.unit))
            ref_lengths = [len(_units(r, self.unit)) for r in refs if r] or [0]
            out.append((h, min(ref_lengths, key=lambda r: (abs(r - h), r))))  # closest, the shorter on ties
        return out

    def sentence_losses(self, decoded):
        return [abs(h / max(r, 1) - self.target) for h, r in self._lengths(decoded)]

    def corpus_stats(self, decoded):
        lengths = self._lengths(decoded)
        return np.array([float(sum(h for h, _ in lengths)), float(sum(r for _, r in lengths))])

    def corpus_loss_from_stats(self, stats):
        return abs(stats[0] / max(stats[1], 1) - self.target)

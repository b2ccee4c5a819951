"""Length ratio to the closest reference."""
from __future__ import annotations

import numpy as np

from mleps.losses.units import UnitOptions, _check_unit, _units
from mleps.task_loss import TaskLoss, register_task_loss


@register_task_loss
class LengthRatio(TaskLoss):
    """|len(hyp)/len(ref) - 1| with the closest reference's length; corpus level pools the lengths."""

    name, options = "length", UnitOptions

    def __init__(self, level: str = "corpus", unit: str = "word"):
        super().__init__(level)
        self.unit = _check_unit(unit)

    def _lengths(self, decoded) -> list[tuple[int, int]]:
        out = []
        for hyp, refs in zip(decoded.texts, decoded.references):
            h = len(_units(hyp, self.unit))
            ref_lengths = [len(_units(r, self.unit)) for r in refs if r] or [0]
            out.append((h, min(ref_lengths, key=lambda r: (abs(r - h), r))))  # closest, the shorter on ties
        return out

    def sentence_losses(self, decoded):
        return [abs(h / max(r, 1) - 1) for h, r in self._lengths(decoded)]

    def corpus_stats(self, decoded):
        lengths = self._lengths(decoded)
        return np.array([float(sum(h for h, _ in lengths)), float(sum(r for _, r in lengths))])

    def corpus_loss_from_stats(self, stats):
        return abs(stats[0] / max(stats[1], 1) - 1)

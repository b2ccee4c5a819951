"""Σ_i w_i loss_i over registered losses, statistics concatenated."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any, List

import numpy as np

from mleps.task_loss import TaskLoss, option_fields, register_task_loss


@dataclass
class CompositeOptions:
    losses: List[str] = field(default_factory=list)  # composite: the component losses' names
    weights: List[Any] = field(default_factory=list)  # composite: one number per loss (checked at start)


@register_task_loss
class Composite(TaskLoss):
    """Σ_i w_i loss_i. The statistics are the components' concatenated, so pooling and all-reduce
    work unchanged; the sentence form exists when every component has one."""

    name, options = "composite", CompositeOptions

    def __init__(self, components: list[TaskLoss], weights: list[float], level: str = "corpus"):
        super().__init__(level)
        self.components, self.weights = components, weights
        self.num_stats = sum(c.num_stats for c in components)

    @classmethod
    def config_options(cls) -> type:
        """Every registered loss's options besides its own: `metric.n` etc. configure the components."""
        return make_dataclass("CompositeConfigOptions", option_fields())

    @classmethod
    def from_options(cls, level: str, options: dict) -> "Composite":
        """The components by name, each with the same metric.* options; raises ValueError for bad lists."""
        losses, weights = options.get("losses") or (), options.get("weights") or ()
        names, weights = list(losses), list(weights)
        if not names or len(names) != len(weights):
            raise ValueError(f"composite needs metric.losses and metric.weights of equal, non-zero length "
                             f"(got {len(names)} losses and {len(weights)} weights)")
        numbers = []
        for w in weights:
            try:
                numbers.append(float(w))
            except (TypeError, ValueError):
                raise ValueError(f"metric.weights holds {w!r}, not a number: give one number per loss") from None
            if not math.isfinite(numbers[-1]):
                raise ValueError(f"metric.weights holds {w!r}: give finite numbers")
        if "composite" in [str(x).lower() for x in names]:
            raise ValueError("a composite cannot contain another composite: list its losses directly")
        from mleps.losses import build_task_loss  # the registry: every component by name, with the same options

        return cls([build_task_loss(x, level, **options) for x in names], numbers, level)

    @property
    def has_sentence_form(self) -> bool:
        return all(c.has_sentence_form for c in self.components)

    def stats(self, decoded):
        return np.concatenate([np.asarray(c.stats(decoded), dtype=np.float64) for c in self.components])

    def parts(self, stats) -> list[float]:
        """Each component's loss from the concatenated statistics."""
        bounds = np.cumsum([0] + [c.num_stats for c in self.components])
        return [c.loss_from_stats(stats[a:b]) for c, a, b in zip(self.components, bounds[:-1], bounds[1:])]

    def loss_from_stats(self, stats):
        return float(sum(w * x for w, x in zip(self.weights, self.parts(np.asarray(stats, dtype=np.float64)))))

    def report(self, stats, hyps, references) -> dict:  # each component's loss beside the weighted sum
        return {"score": self.score_from_stats(stats), **{c.name: x for c, x in zip(self.components, self.parts(stats))}}

    def sentence_losses(self, decoded):
        per_component = [c.sentence_losses(decoded) for c in self.components]
        return [sum(w * x for w, x in zip(self.weights, row)) for row in zip(*per_component)]

    def at_level(self, level: str) -> "Composite":
        other = super().at_level(level)
        other.components = [c.at_level(level) for c in self.components]
        return other

    def bind(self, model, tokenizer) -> None:
        for c in self.components:
            c.bind(model, tokenizer)

    def __repr__(self) -> str:
        return f"Composite({', '.join(f'{w}*{c.name}' for w, c in zip(self.weights, self.components))})"

"""seq-rep-n, two ways: pooled n-gram counts (repetition) and the per-output share the MGS paper reports (seq_rep)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mleps.task_loss import TaskLoss, _mean, register_task_loss


@dataclass
class NgramOptions:
    n: int = 4  # repetition, seq_rep: n-gram order of seq-rep-n


@register_task_loss
class Repetition(TaskLoss):
    """seq-rep-n (Welleck et al., 2020) on the model's tokens; corpus level pools the n-gram counts."""

    name, options = "repetition", NgramOptions

    def __init__(self, level: str = "corpus", n: int = 4):
        super().__init__(level)
        if int(n) < 1:
            raise ValueError(f"repetition needs n >= 1 (got {n})")
        self.n = int(n)

    def _counts(self, tokens: list[int]) -> tuple[int, int]:
        ngrams = [tuple(tokens[i:i + self.n]) for i in range(len(tokens) - self.n + 1)]
        return len(ngrams) - len(set(ngrams)), len(ngrams)

    def sentence_losses(self, decoded):
        return [_mean(self._counts(t)) for t in decoded.token_ids]  # fewer than n tokens: 0

    def corpus_stats(self, decoded):
        counts = [self._counts(t) for t in decoded.token_ids]
        return np.array([float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts))])


@register_task_loss
class SeqRep(Repetition):
    """seq-rep-n per output, 1 - unique/total n-grams, averaged over the outputs with at least n tokens
    (the paper's tables; wellecks/mgs). The sentence form gives an output shorter than n a 0."""

    name = "seq_rep"

    def _share(self, tokens: list[int]) -> float | None:
        repeated, total = self._counts(tokens)
        return repeated / total if total else None

    def sentence_losses(self, decoded):
        return [self._share(t) or 0.0 for t in decoded.token_ids]

    def corpus_stats(self, decoded):
        shares = [x for x in map(self._share, decoded.token_ids) if x is not None]
        return np.array([float(sum(shares)), float(len(shares))])

    def corpus_loss_from_stats(self, stats):
        return _mean(stats)

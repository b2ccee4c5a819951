"""The task-loss contract: what every rule minimises and every evaluation reports.

A task loss receives one `DecodedBatch` (mleps.decoding: texts, generated token ids, whether
each output ended with EOS, references, sources) and returns additive sufficient statistics,
a 1-D float array. Statistics of disjoint parts add up to those of the whole, so

    corpus pooling     sum the statistics of the batches, then `loss_from_stats`
    several processes  all-reduce (sum) the statistics, then `loss_from_stats`
    sentence level     statistics are [sum of sentence losses, count]

work for every loss without per-loss code in the trainers. `loss_from_stats` turns summed
statistics into the loss: lower is better; it need not be bounded (MGS's weights use loss
differences). `sentence_losses` is the per-output form that PG and MRT use; a loss without one
leaves `has_sentence_form` False. `score_from_stats` is what validation reports as `score`
(a metric's own scale, e.g. BLEU 0..100 with `higher_is_better`; for the other losses the
loss itself).

    loss = build_task_loss("repetition", n=4)          # mleps.losses
    stats = loss.stats(decoded_a) + loss.stats(decoded_b)
    loss.loss_from_stats(stats)
"""
from __future__ import annotations

import numpy as np

LEVELS = ("corpus", "sentence")


class TaskLoss:
    name: str = ""
    higher_is_better: bool = False  # of score_from_stats; the loss is always lower-is-better
    num_stats: int = 2  # length of the statistics array (composites split theirs by it)

    def __init__(self, level: str = "corpus"):
        if level not in LEVELS:
            raise ValueError(f"unknown metric level {level!r}; choose one of: {', '.join(LEVELS)}")
        self.level = level

    # -- what a loss implements: sentence_losses, and/or corpus_stats + corpus_loss_from_stats
    def sentence_losses(self, decoded) -> list[float]:
        """One loss per output."""
        raise NotImplementedError(f"{self.name} has no sentence form")

    def corpus_stats(self, decoded) -> np.ndarray:
        """Additive statistics of the corpus form; by default [sum of sentence losses, count]."""
        losses = self.sentence_losses(decoded)
        return np.array([float(sum(losses)), float(len(losses))])

    def corpus_loss_from_stats(self, stats: np.ndarray) -> float:
        return _mean(stats)

    # -- the contract, for every loss
    @property
    def has_sentence_form(self) -> bool:
        return type(self).sentence_losses is not TaskLoss.sentence_losses

    def stats(self, decoded) -> np.ndarray:
        if self.level == "sentence":
            losses = self.sentence_losses(decoded)
            return np.array([float(sum(losses)), float(len(losses))])
        return np.asarray(self.corpus_stats(decoded), dtype=np.float64)

    def loss_from_stats(self, stats) -> float:
        stats = np.asarray(stats, dtype=np.float64)
        return _mean(stats) if self.level == "sentence" else float(self.corpus_loss_from_stats(stats))

    def score_from_stats(self, stats) -> float:
        return self.loss_from_stats(stats)

    def loss(self, decoded) -> float:
        return self.loss_from_stats(self.stats(decoded))

    def bind(self, model, tokenizer) -> None:
        """Called once with the run's model before training (model-based losses keep what they need)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r})"


def _mean(stats) -> float:
    return float(stats[0] / stats[1]) if stats[1] else 0.0

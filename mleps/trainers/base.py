"""The contract between the training loop and an update rule.

The loop owns data, accelerate, the optimizer, logging, evaluation and checkpoints. A rule
owns its step. The loop calls `update(micro_batches, step)` with this process's share of the
step's global batch; it must leave a descent direction in every trainable parameter's `.grad`
(by backward, or by writing it as MGS does), identical on every process, and return raw float
statistics for the log. `apply(optimizer)` then turns `.grad` into a parameter update.

Rules whose gradient is an average over examples (mle, pg, mrt) only write `step(batch, step,
shard)` for one micro-batch: the default `update` runs it on each micro-batch, with DDP's
gradient all-reduce held back until the last one, and `Shard` scales each micro-batch's loss
so that the accumulated, all-reduced gradient is the gradient of the loss on the whole
global batch.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed

from mleps.families import family_for


@dataclass(frozen=True)
class Shard:
    """A micro-batch's place in the step's global batch. The defaults: the whole batch, one process.

    index      micro-batch j of the step (rank * accumulation + micro): seeds this micro-batch's
               sampling, so a run's samples do not depend on how micro-batches map to processes
    processes  DDP averages gradients over processes: losses are multiplied back by this
    tokens     label tokens in the global batch (None: this micro-batch's own)
    examples   sources in the global batch (None: this micro-batch's own)
    local      this process's own micro-batch (population MGS also decodes the others')
    """

    index: int = 0
    processes: int = 1
    tokens: int | None = None
    examples: int | None = None
    local: bool = True

    def per_token(self, loss_sum: torch.Tensor, tokens: int) -> torch.Tensor:
        """A sum over this micro-batch's tokens -> its share of the global per-token mean."""
        return loss_sum * (self.processes / (self.tokens or tokens))

    def per_example(self, loss_sum: torch.Tensor, examples: int) -> torch.Tensor:
        """A sum over this micro-batch's sources -> its share of the global per-source mean."""
        return loss_sum * (self.processes / (self.examples or examples))


class UpdateRule:
    clip_in_loop = True  # the loop clips .grad to trainer.max_grad_norm before apply()
    needs_every_micro_batch = False  # True: update() gets the step's whole global batch on every process

    def __init__(self, cfg, model, tokenizer, metric, accelerator, seed: int = 0):
        self.cfg = cfg  # the trainer config section
        self.model = model  # possibly wrapped by accelerate (DDP)
        self.tokenizer = tokenizer
        self.metric = metric
        self.accelerator = accelerator
        self.seed = seed
        self.check_config(cfg)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise UserError for option values this rule cannot run with. Called at start for every
        phase (mleps.validate), before anything is written, and again when the rule is built."""

    @property
    def rows_per_micro_batch(self) -> int:
        """Rows the loop draws per micro-batch (MGS may score more rows than its guide uses)."""
        return self.cfg.batch_size

    def max_new_tokens(self, batch: dict) -> int:
        """This batch's limit for training-time decodes: trainer.max_new_tokens, or with
        trainer.max_length_ratio r, ceil(r x the longest reference in the batch, EOS included), at most that."""
        ratio = self.cfg.get("max_length_ratio")
        if not ratio:
            return self.cfg.max_new_tokens
        longest = int((batch["labels"] != -100).sum(1).max())
        return max(1, min(self.cfg.max_new_tokens, math.ceil(ratio * longest)))

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def update(self, micro_batches: list[tuple[Shard, dict]], step: int) -> dict[str, float]:
        """Run `step` on each of this process's micro-batches."""
        return mean_stats([self.step(batch, step, shard) for shard, batch in self.backward_passes(micro_batches, step)])

    def backward_passes(self, micro_batches: list[tuple[Shard, dict]], step: int):
        """This process's micro-batches, each yielded inside the context its backward needs: dropout
        seeded by (seed, step, j), like its rows, and DDP's all-reduce held back until the last, so the
        gradients add up and are all-reduced once."""
        own = [(shard, batch) for shard, batch in micro_batches if shard.local]
        for n, (shard, batch) in enumerate(own):
            set_seed(self.step_seed(step, shard.index) % 2**32)
            with contextlib.nullcontext() if n == len(own) - 1 else self.accelerator.no_sync(self.model):
                yield shard, batch

    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        raise NotImplementedError

    def apply(self, optimizer) -> None:
        optimizer.step()

    def step_seed(self, step: int, index: int = 0) -> int:
        """A seed for micro-batch `index` of a step: a function of (seed, step, index), so resume
        needs no RNG replay and every process can compute every other's."""
        return (self.seed * 1_000_003 + step * 7_919 + index * 104_729 + 17) % (2**63 - 1)


def mean_stats(per_micro: list[dict[str, float]]) -> dict[str, float]:
    if len(per_micro) == 1:
        return per_micro[0]
    return {k: sum(s[k] for s in per_micro) / len(per_micro) for k in per_micro[0]}


def token_cross_entropy(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Token cross-entropy summed over the batch's loss tokens, and their count (mleps.families)."""
    return family_for(model).token_cross_entropy(model, batch, label_smoothing)


def label_tokens(batch: dict) -> int:
    """The tokens token_cross_entropy counts: the labels (and a decoder-only batch's scored prompt tokens)."""
    return sum(int((batch[k] != -100).sum()) for k in ("labels", "prompt_labels") if k in batch)

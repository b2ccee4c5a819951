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
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from accelerate.utils import set_seed
from omegaconf import MISSING

from mleps.families import family_for
from mleps.task_loss import require_sentence_form


@dataclass
class TrainerConfig:
    """The trainer section every rule shares (steps, batch layout, optimizer, schedule, logging, the warm
    start); each rule's schema extends it with its own knobs, beside its step."""

    name: str = MISSING
    max_steps: int = 1000
    batch_size: int = 64  # per process and micro-batch: the global batch is batch_size x processes x accumulation
    gradient_accumulation_steps: int = 1  # micro-batches per process per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    schedule: str = "inverse_sqrt"  # constant | linear | inverse_sqrt | cosine
    warmup_steps: int = 100
    max_grad_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    eval_every: int = 500
    log_every: int = 25
    save_every: int = 500
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    max_train_s: Optional[float] = None  # stop the phase after this much training time (equal-time comparisons)
    # null: batch_size rows per micro-batch; N: length-sorted batches of at most N padded tokens
    # (completion; the reference code's --chunk-size-train), mleps.data.TokenBudgetStream
    batch_tokens: Optional[int] = None
    # training-time decodes (mgs, pg, mrt) stop at ceil(ratio x the batch's longest reference), at most
    # trainer.max_new_tokens; null = always trainer.max_new_tokens (the reference code uses 1.3)
    max_length_ratio: Optional[float] = None
    patience: Optional[int] = None  # end the phase after this many evaluations without a new best (null = off)
    # The paper's recipe: MLE from scratch, then this rule. Skipped when 0. The warm start is an
    # MLE phase with these settings and this trainer's batch layout, clipping and logging.
    warm_start_steps: int = 0
    warm_start_lr: float = 1e-3
    warm_start_eval_every: int = 500
    warm_start_schedule: str = "inverse_sqrt"
    warm_start_warmup_steps: int = 200
    warm_start_label_smoothing: float = 0.1


RULES: dict[str, type["UpdateRule"]] = {}  # trainer=<name> -> its rule; filled by register_rule


def register_rule(cls: type["UpdateRule"]) -> type["UpdateRule"]:
    """Class decorator: make `cls` the rule of `trainer=<cls.name>`. Its `schema` is registered with Hydra
    by mleps.config.register_configs (the built-in rules are imported by mleps.trainers)."""
    if not cls.name or not (isinstance(cls.schema, type) and issubclass(cls.schema, TrainerConfig)):
        raise TypeError(f"{cls.__name__} needs a name and a schema (a TrainerConfig subclass) to be registered")
    RULES[cls.name] = cls
    return cls


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
    """A rule declares what it needs in class attributes, which the loop reads (never its name):

    name                 the trainer= option; `schema` its config dataclass (a TrainerConfig subclass)
    needs_sentence_loss  the task loss must score each output on its own (checked at start)
    needs_optimizer      the rule is built with the phase's optimizer (MGS centres proposals on its step)
    clip_in_loop         the loop clips .grad to trainer.max_grad_norm before apply()
    needs_whole_parameters  the rule reads and writes whole parameters itself (MGS perturbs them in
                         place), so it cannot run on FSDP's shards (refused at start)
    needs_start_model(cfg)  the rule keeps a frozen copy of the model its phase starts from (pg's KL
                         penalty): the loop saves that model as checkpoints/<phase>_start and hands it
                         back as `start_model` when a run resumes within the phase

    `probes` are optional per-step hooks a rule may call for measurements (MGS calls
    mleps.trainers.mgs.SearchProbe's); the loop passes what its callbacks supply.
    """

    name: str = ""
    schema: type = TrainerConfig
    needs_sentence_loss = False
    needs_optimizer = False
    clip_in_loop = True
    needs_whole_parameters = False
    needs_every_micro_batch = False  # True: update() gets the step's whole global batch on every process

    def __init__(self, cfg, model, tokenizer, metric, accelerator, seed: int = 0, optimizer=None, probes=(),
                 start_model=None):
        self.cfg = cfg  # the trainer config section
        self.model = model  # possibly wrapped by accelerate (DDP)
        self.tokenizer = tokenizer
        self.metric = metric
        self.accelerator = accelerator
        self.seed = seed
        self.optimizer = optimizer  # the phase's optimizer, for rules with needs_optimizer
        self.probes = list(probes)
        self.start_model = start_model  # with needs_start_model: the phase's first weights (None: the model now)
        self.check_config(cfg)
        if self.needs_sentence_loss:
            require_sentence_form(metric, self.name)

    @classmethod
    def needs_start_model(cls, cfg) -> bool:
        return False

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

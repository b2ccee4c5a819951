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

Registering a loss (one module; `metric=<name>` then builds it, and its options become the `metric.*` keys
of its own config node, `<name>_metric_schema` in Hydra's ConfigStore, so a user's package may register one
after mleps is imported, before the config is composed):

    @dataclass
    class MyOptions:
        width: int = 3  # what it means (the help text of metric.width)

    @register_task_loss
    class MyLoss(TaskLoss):
        name, options = "my_loss", MyOptions
        def __init__(self, level="corpus", width=3): ...

`options` is a dataclass of the loss's own knobs; `from_options` builds the loss from the metric
config's values of them (override it when the constructor's names differ from the config's). The
losses of `eval.metrics` are built from the main loss's node: an option of the same name is shared,
the others take their defaults.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass

import numpy as np

from mleps.choice import Choice
from mleps.errors import UserError


class Level(Choice):
    corpus = "corpus"  # one loss pooled over the batch
    sentence = "sentence"  # the mean of sentence losses


LEVELS = tuple(m.value for m in Level)


@dataclass
class NoOptions:
    """A loss without knobs of its own."""


TASK_LOSSES: dict[str, type["TaskLoss"]] = {}  # metric=<name> -> its class; filled by register_task_loss


def register_task_loss(cls: type["TaskLoss"]) -> type["TaskLoss"]:
    """Class decorator: `metric=<cls.name>` (and build_task_loss) builds `cls`, and `cls.options` becomes its
    own config node (mleps.config.metric_schema). A name is registered once. Options that another loss also
    declares must agree in type and default: metric=composite holds every loss's options as one namespace."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name to be registered")
    known = TASK_LOSSES.get(cls.name)
    if known is not None and _qualname(known) != _qualname(cls):  # the same class imported again is no clash
        raise UserError(f"task loss {cls.name!r} is registered twice ({_qualname(known)} and {_qualname(cls)}): "
                        f"give one of them another name")
    mine = {f.name: f for f in dataclasses.fields(cls.options)}
    for other in TASK_LOSSES.values():
        for f in dataclasses.fields(other.options):
            if f.name in mine and (str(f.type), _default(f)) != (str(mine[f.name].type), _default(mine[f.name])):
                raise TypeError(f"{cls.__name__}'s option {f.name} differs from {other.__name__}'s: metric=composite "
                                f"holds both as one metric.{f.name}, so give it the same type and default or another name")
    TASK_LOSSES[cls.name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def option_fields() -> list[tuple[str, object, dataclasses.Field]]:
    """Every registered loss's options, once each, in registration order (metric=composite's node)."""
    seen: dict[str, tuple] = {}
    for cls in TASK_LOSSES.values():
        types = typing.get_type_hints(cls.options)  # real types, also under `from __future__ import annotations`
        for f in dataclasses.fields(cls.options):
            seen.setdefault(f.name, (f.name, types[f.name],
                                     dataclasses.field(default=f.default, default_factory=f.default_factory)))
    return list(seen.values())


class TaskLoss:
    name: str = ""
    options: type = NoOptions  # a dataclass of this loss's own metric.* knobs (its config node)
    higher_is_better: bool = False  # of score_from_stats; the loss is always lower-is-better
    num_stats: int = 2  # length of the statistics array (composites split theirs by it)

    @classmethod
    def config_options(cls) -> type:
        """The dataclass of this loss's `metric.*` keys (its config node, mleps.config.metric_schema):
        `options`, unless the loss reads others' (composite's components)."""
        return cls.options

    @classmethod
    def from_options(cls, level: str, options: dict) -> "TaskLoss":
        """The loss at `level` from a metric config's values (missing options take their defaults)."""
        return cls(level, **{f.name: options.get(f.name, _default(f)) for f in dataclasses.fields(cls.options)})

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

    @property
    def needs_start_model(self) -> bool:
        """`bind` keeps a copy of the model it is given (lm without score_model): on a resume the loop binds
        the model the run started from (checkpoints/run_start), not the resumed one."""
        return False

    def stats(self, decoded) -> np.ndarray:
        if self.level == "sentence":
            losses = self.sentence_losses(decoded)
            return np.array([float(sum(losses)), float(len(losses))])
        return np.asarray(self.corpus_stats(decoded), dtype=np.float64)

    def stats_and_sentence_losses(self, decoded) -> tuple[np.ndarray, list[float]]:
        """`stats` and `sentence_losses` of one batch (evaluate per_example=true wants both); a loss whose
        two forms share an expensive pass (lm's forward) overrides it to run that pass once."""
        return self.stats(decoded), self.sentence_losses(decoded)

    def loss_from_stats(self, stats) -> float:
        stats = np.asarray(stats, dtype=np.float64)
        return _mean(stats) if self.level == "sentence" else float(self.corpus_loss_from_stats(stats))

    def score_from_stats(self, stats) -> float:
        return self.loss_from_stats(stats)

    def report(self, stats, hyps: list[str], references: list[list[str]]) -> dict:
        """What validation and evaluation report for summed `stats` ({"score": ...}, plus whatever a
        loss adds, e.g. a text metric's library details from the gathered `hyps`)."""
        return {"score": self.score_from_stats(stats)}

    def loss(self, decoded) -> float:
        return self.loss_from_stats(self.stats(decoded))

    def at_level(self, level: str) -> "TaskLoss":
        """A copy of this loss pooled at `level` (model-based state, such as a bound score model, is shared)."""
        if level not in LEVELS:
            raise ValueError(f"unknown metric level {level!r}; choose one of: {', '.join(LEVELS)}")
        other = copy.copy(self)
        other.level = level
        return other

    def bind(self, model, tokenizer) -> None:
        """Called once with the run's model before training (model-based losses keep what they need)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r})"


def require_sentence_form(loss: TaskLoss, rule: str) -> None:
    """PG and MRT score each output on its own: a corpus-only loss cannot be their reward."""
    if not loss.has_sentence_form:
        raise UserError(f"trainer={rule} needs a per-output (sentence) loss, and metric={loss.name} only has a "
                        f"corpus form: choose another metric.name, or trainer=mgs, which optimises corpus losses")




def at_level(loss: TaskLoss, level: str) -> TaskLoss:
    """The same loss pooled at `level` (validation reports the corpus form of the training loss)."""
    return loss.at_level(level)

def _mean(stats) -> float:
    return float(stats[0] / stats[1]) if stats[1] else 0.0

"""Task losses by name: the registry every `metric=<name>` resolves through, and the built-in losses.

Each loss is one module here (the text metrics BLEU, chrF and ROUGE live in mleps.metrics) that
follows mleps.task_loss.TaskLoss and registers itself with `@register_task_loss`; its options
dataclass becomes the `metric.*` keys of its own config node (mleps.config.metric_schema). docs/metrics.md
lists statistics, levels and ranges.

  repetition      seq-rep-n on generated token ids: 1 - |distinct n-grams| / |n-grams| of an output;
                  corpus level pools the n-gram counts over the outputs
  seq_rep         seq-rep-n as Welleck et al. report it: per output (trimmed at EOS), averaged over the
                  outputs with at least n tokens
  nontermination  1 for an output that hit max_new_tokens without EOS, else 0
  edit            Levenshtein distance to the closest reference / the longer of the two (words or chars)
  length          |len(hyp)/len(ref) - 1| in words (closest reference); corpus: |Σ hyp / Σ ref - 1|
  lm              NLL of the output under a frozen score model: per token (reduction=mean, statistics
                  nll_sum, tokens) or of the whole sequence (reduction=sum, MGS-LM: nll_sum, sequences)
  custom          a user's function named by import path: fn(decoded) -> one float loss per output
  composite       Σ_i w_i loss_i, statistics concatenated

Adding one: a module in this folder (imported below by discovery) or anywhere the user imports it
before the config is composed; mleps/conf/metric/<name>.yaml (defaults: [<name>_metric_schema]) adds a
commented preset, and without one `metric=<name>` is the schema's own defaults.
"""
from __future__ import annotations

import importlib
import pkgutil

from mleps import metrics as _text_metrics  # noqa: F401  (bleu, chrf, rouge register first)
from mleps.task_loss import TASK_LOSSES, TaskLoss, register_task_loss, require_sentence_form

# Every module of this package registers its losses on import (a new loss needs no line here).
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

from mleps.losses.composite import Composite  # noqa: E402
from mleps.losses.custom import CallableLoss, Custom, load_callable  # noqa: E402
from mleps.losses.edit import EditDistance, levenshtein  # noqa: E402
from mleps.losses.length import LengthRatio  # noqa: E402
from mleps.losses.lm import LMScore  # noqa: E402
from mleps.losses.nontermination import NonTermination  # noqa: E402
from mleps.losses.repetition import Repetition, SeqRep  # noqa: E402

__all__ = ["TASK_LOSSES", "TaskLoss", "register_task_loss", "require_sentence_form", "build_task_loss", "loss_names",
           "Composite", "CallableLoss", "Custom", "load_callable", "EditDistance", "levenshtein", "LengthRatio",
           "LMScore", "NonTermination", "Repetition", "SeqRep"]


def loss_names() -> tuple[str, ...]:
    return tuple(TASK_LOSSES)


def build_task_loss(name: str, level: str = "corpus", **options) -> TaskLoss:
    """Any registered task loss by name, with the metric config's options (those it does not declare are
    ignored: eval.metrics and composite's components share the main loss's node). Bad names and options raise ValueError
    (UserError for custom/lm)."""
    key = str(name).lower()
    if key not in TASK_LOSSES:
        raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(TASK_LOSSES)}")
    return TASK_LOSSES[key].from_options(level, options)

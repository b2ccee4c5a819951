"""A user's function as the task loss: `metric=custom metric.fn=package.module:function`."""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Optional

from mleps.errors import UserError
from mleps.task_loss import TaskLoss, register_task_loss


@dataclass
class CustomOptions:
    fn: Optional[str] = None  # custom: package.module:function, fn(decoded) -> one float per output


@register_task_loss
class Custom(TaskLoss):
    """A user's callable `fn(decoded: DecodedBatch) -> Sequence[float]`, one finite loss per output
    (lower is better); pooled as the mean at both levels. `fn` is "package.module:function"."""

    name, options = "custom", CustomOptions

    def __init__(self, level: str = "corpus", fn: str | None = None):
        super().__init__(level)
        self.fn_name = fn
        self.fn = load_callable(fn)

    def sentence_losses(self, decoded):
        return checked_losses(self.fn(decoded), len(decoded), f"metric.fn={self.fn_name}")


def checked_losses(out, expected: int, what: str) -> list[float]:
    """A user function's output as one finite float per output, or a UserError naming `what`."""
    try:
        losses = [float(x) for x in out]
    except (TypeError, ValueError):
        raise UserError(f"{what} returned {type(out).__name__}: it must return one float "
                        f"per output (a list of {expected})") from None
    if len(losses) != expected:
        raise UserError(f"{what} returned {len(losses)} values for {expected} outputs: "
                        f"it must return one float per output")
    if not all(math.isfinite(x) for x in losses):
        raise UserError(f"{what} returned a non-finite value (NaN or inf): every loss must "
                        f"be a finite float")
    return losses


class CallableLoss(TaskLoss):
    """A Python function as the task loss (mleps.api: `Trainer(task_loss=fn)`), one finite loss per output,
    lower is better, pooled as the mean at both levels. It is called with the keyword arguments it names
    among `completions` (the output texts), `references` (each output's reference texts), `sources`, and
    the batch's extra dataset columns (one value per output, e.g. a reward function's labels); a
    `**kwargs` parameter receives them all. Not registered: it is built from the function itself."""

    def __init__(self, fn, level: str = "corpus", name: str | None = None):
        super().__init__(level)
        if not callable(fn):
            raise UserError(f"task loss {fn!r} is not callable: pass a function, a TaskLoss or a registered name")
        self.fn = fn
        own = getattr(fn, "__name__", "")
        self.name = name or (own if own.isidentifier() else "custom")
        params = inspect.signature(fn).parameters.values()
        self._takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self._named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)]

    def sentence_losses(self, decoded):
        available = {"completions": decoded.texts, "references": decoded.references, "sources": decoded.sources,
                     **(decoded.columns or {})}
        missing = [n for n in self._named if n not in available]
        if missing:
            raise UserError(f"task loss {self.name} takes {', '.join(missing)}, which the batch does not have: it "
                            f"has {', '.join(available)}")
        kwargs = available if self._takes_all else {n: available[n] for n in self._named}
        return checked_losses(self.fn(**kwargs), len(decoded), f"task loss {self.name}")


def load_callable(spec: str | None):
    if not spec or ":" not in str(spec):
        raise UserError(f"metric=custom needs metric.fn=package.module:function (got {spec!r})")
    module_name, _, attr = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"metric.fn={spec} cannot be imported ({type(e).__name__}: {e}): put the module on "
                        f"PYTHONPATH and name it as package.module:function") from None
    if not callable(fn):
        raise UserError(f"metric.fn={spec} is not callable: name a function")
    return fn

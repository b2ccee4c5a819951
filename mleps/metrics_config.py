"""The `metric` config group -> a task loss (mleps.losses), with config errors as UserError."""
from __future__ import annotations

from omegaconf import OmegaConf

from mleps.errors import UserError
from mleps.losses import build_task_loss


def metric_from_config(metric_cfg, level: str | None = None, name: str | None = None):
    """The loss of `metric_cfg` (or, with `name`, that loss with the same options: eval.metrics)."""
    options = OmegaConf.to_container(metric_cfg, resolve=True) if OmegaConf.is_config(metric_cfg) else dict(metric_cfg)
    name = name or options.pop("name")
    level = str(level or options.get("level", "corpus"))  # a Level member is its string
    options.pop("name", None), options.pop("level", None)
    try:
        return build_task_loss(name, level, **options)
    except ValueError as e:
        raise UserError(f"metric: {e}") from None


def eval_metrics_from_config(metric_cfg, names) -> list:
    """The secondary validation metrics (eval.metrics), at corpus level, built from the main loss's node: an
    option of the same name (metric.n, metric.unit, ...) is shared, the others take their defaults."""
    return [metric_from_config(metric_cfg, level="corpus", name=n) for n in (names or [])]

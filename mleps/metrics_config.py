"""The `metric` config group -> a metric object (mleps.metrics), with config errors as UserError."""
from __future__ import annotations

from mleps.errors import UserError
from mleps.metrics import build_metric


def metric_from_config(metric_cfg, level: str | None = None):
    rouge = metric_cfg.name == "rouge"
    try:
        return build_metric(
            name=metric_cfg.name, level=level or metric_cfg.level,
            tokenizer=metric_cfg.rouge_tokenizer if rouge else None,
            **({"rouge_key": metric_cfg.rouge_key} if rouge else {}),
        )
    except ValueError as e:
        raise UserError(f"metric: {e}") from None

"""The `metric` config group -> a task loss (mleps.losses), with config errors as UserError."""
from __future__ import annotations

from omegaconf import OmegaConf

from mleps.errors import UserError
from mleps.losses import build_task_loss


def metric_from_config(metric_cfg, level: str | None = None, name: str | None = None):
    """The loss of `metric_cfg` (or, with `name`, that loss with the same options: eval.metrics)."""
    name = name or metric_cfg.name
    options = OmegaConf.to_container(metric_cfg, resolve=True) if OmegaConf.is_config(metric_cfg) else dict(metric_cfg)
    try:
        return build_task_loss(
            name, level=level or options.get("level", "corpus"), tokenizer=options.get("rouge_tokenizer"),
            rouge_key=options.get("rouge_key", "rougeL"), n=options.get("n", 4), unit=options.get("unit", "word"),
            score_model=options.get("score_model"), fn=options.get("fn"),
            losses=options.get("losses") or (), weights=options.get("weights") or (),
            reduction=options.get("reduction", "mean"),
        )
    except ValueError as e:
        raise UserError(f"metric: {e}") from None


def eval_metrics_from_config(metric_cfg, names) -> list:
    """The secondary validation metrics (eval.metrics), at corpus level, sharing metric.* options."""
    return [metric_from_config(metric_cfg, level="corpus", name=n) for n in (names or [])]

"""Maximum likelihood: token cross-entropy (with optional label smoothing), then backward."""
from __future__ import annotations

from dataclasses import dataclass

from mleps.trainers.base import Shard, TrainerConfig, UpdateRule, register_rule, token_cross_entropy


@dataclass
class MLEConfig(TrainerConfig):
    name: str = "mle"


@register_rule
class MLE(UpdateRule):
    name, schema = "mle", MLEConfig

    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        loss_sum, tokens = token_cross_entropy(self.model, batch, self.cfg.label_smoothing)
        self.accelerator.backward(shard.per_token(loss_sum, tokens))
        cross_entropy = loss_sum.item() / tokens
        return {"loss": cross_entropy, "cross_entropy": cross_entropy, "tokens": float(tokens)}

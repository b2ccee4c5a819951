"""Maximum likelihood: token cross-entropy (with optional label smoothing), then backward."""
from __future__ import annotations

from mleps.trainers.base import Shard, UpdateRule, token_cross_entropy


class MLE(UpdateRule):
    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        loss_sum, tokens = token_cross_entropy(self.model, batch, self.cfg.label_smoothing)
        self.accelerator.backward(shard.per_token(loss_sum, tokens))
        cross_entropy = loss_sum.item() / tokens
        return {"loss": cross_entropy, "cross_entropy": cross_entropy, "tokens": float(tokens)}

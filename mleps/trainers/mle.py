"""Maximum likelihood: token cross-entropy (with optional label smoothing), then backward."""
from __future__ import annotations

from mleps.trainers.base import UpdateRule, token_cross_entropy


class MLE(UpdateRule):
    def step(self, batch: dict, step: int) -> dict[str, float]:
        loss, tokens = token_cross_entropy(self.model, batch, self.cfg.label_smoothing)
        self.accelerator.backward(loss)
        return {"loss": loss.item(), "cross_entropy": loss.item(), "tokens": float(tokens)}

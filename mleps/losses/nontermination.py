"""Non-termination: the share of outputs that hit the length limit without EOS."""
from __future__ import annotations

from mleps.task_loss import TaskLoss, register_task_loss


@register_task_loss
class NonTermination(TaskLoss):
    """The share of outputs that reached the length limit without EOS (the same at both levels)."""

    name = "nontermination"

    def sentence_losses(self, decoded):
        return [0.0 if ended else 1.0 for ended in decoded.ended_with_eos]

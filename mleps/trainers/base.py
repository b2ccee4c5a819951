"""The contract between the training loop and an update rule.

The loop owns data, accelerate, the optimizer, logging, evaluation and checkpoints. A rule
owns its step: `step(batch, step)` leaves a descent direction in every trainable parameter's
`.grad` (by backward, or by writing it as MGS does) and returns raw float statistics for
the log; `apply(optimizer)` turns `.grad` into a parameter update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class UpdateRule:
    clip_in_loop = True  # the loop clips .grad to trainer.max_grad_norm before apply()

    def __init__(self, cfg, model, tokenizer, metric, accelerator, seed: int = 0):
        self.cfg = cfg  # the trainer config section
        self.model = model  # possibly wrapped by accelerate (DDP)
        self.tokenizer = tokenizer
        self.metric = metric
        self.accelerator = accelerator
        self.seed = seed

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def step(self, batch: dict, step: int) -> dict[str, float]:
        raise NotImplementedError

    def apply(self, optimizer) -> None:
        optimizer.step()

    def step_seed(self, step: int) -> int:
        """A seed for this step's sampling: a function of (seed, step), so resume needs no RNG replay."""
        return (self.seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def token_cross_entropy(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy over non-padding labels, and the token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, int((labels != -100).sum())

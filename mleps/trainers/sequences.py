"""Sampled outputs, their log-probabilities and the MLE mix, shared by the sequence-level rules (pg, mrt).

`generate` returns rows that start with a start column (the decoder start token; the pad token
for a decoder-only model, whose prompt is not part of the row) and, once a row has emitted EOS,
go on with padding. Read as teacher forcing (mleps.families `logits`): labels are ids[:, 1:],
and a row's labels count up to and including its first EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mleps.decoding import eos_ids, generate
from mleps.errors import UserError
from mleps.families import label_mask, sequence_log_probs, token_log_probs  # noqa: F401  (imported by the rules)
from mleps.trainers.base import Shard, TrainerConfig, UpdateRule, token_cross_entropy


@dataclass
class SequenceSamplingConfig(TrainerConfig):
    """Shared by the rules that sample outputs per source (pg, mrt): fine-tuning defaults."""

    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    num_samples: int = 4  # sampled outputs per source
    sample_temperature: float = 1.0
    mle_mix: float = 0.1  # weight of the token cross-entropy on the references
    max_new_tokens: int = 64


class SequenceSamplingRule(UpdateRule):
    """What pg and mrt share: a per-output task loss, and the MLE mix in their objective."""

    needs_sentence_loss = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.eos = eos_ids(self.unwrapped)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_sampling_config(cfg)

    def backward_with_mle_mix(self, batch: dict, shard: Shard, loss_sum: torch.Tensor, sources: int) -> torch.Tensor:
        """Backward of `loss_sum` (summed over this micro-batch's `sources`) as its share of the global
        per-source mean, plus trainer.mle_mix x the references' token cross-entropy (only logged when the
        mix is 0). Returns that cross-entropy per token, detached."""
        mix = self.cfg.mle_mix
        with torch.set_grad_enabled(mix > 0):  # without the mix, cross-entropy is only logged
            cross_entropy_sum, tokens = token_cross_entropy(self.model, batch, self.cfg.label_smoothing)
        objective = shard.per_example(loss_sum, sources)
        if mix > 0:
            objective = objective + mix * shard.per_token(cross_entropy_sum, tokens)
        self.accelerator.backward(objective)
        return cross_entropy_sum.detach() / tokens


def check_sampling_config(cfg) -> None:
    """The knobs pg and mrt share (SequenceSamplingConfig)."""
    if cfg.num_samples < 1:
        raise UserError(f"trainer.num_samples={cfg.num_samples}: use 1 or more")
    if not cfg.sample_temperature > 0:
        raise UserError(f"trainer.sample_temperature={cfg.sample_temperature}: use a number > 0")
    if not cfg.mle_mix >= 0:
        raise UserError(f"trainer.mle_mix={cfg.mle_mix}: use a number >= 0")
    if cfg.max_new_tokens < 1:
        raise UserError(f"trainer.max_new_tokens={cfg.max_new_tokens}: use 1 or more")


def sample(model, batch: dict, *, num_samples: int, temperature: float, max_new_tokens: int,
           seed: int) -> torch.Tensor:
    """(B·K, T) ancestral samples; source i owns rows i·K .. i·K+K-1 (generate's order)."""
    torch.manual_seed(seed)  # a function of (run seed, step): reruns and resumes draw the same samples
    return generate(model, batch, max_new_tokens=max_new_tokens, do_sample=True,
                    num_return_sequences=num_samples, temperature=temperature)


def trim(ids: torch.Tensor, eos: list[int]) -> list[tuple[int, ...]]:
    """Each row as a tuple of ids through its first EOS: equal tuples are the same output."""
    lengths = 1 + label_mask(ids[:, 1:], eos).sum(1)
    return [tuple(row[:n]) for row, n in zip(ids.tolist(), lengths.tolist())]


def pad_rows(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, longest) ids and the N row lengths."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


def distinct_per_source(rows: list[tuple[int, ...]], num_samples: int) -> float:
    """Mean number of different outputs among each source's K samples."""
    groups = [rows[i:i + num_samples] for i in range(0, len(rows), num_samples)]
    return sum(len(set(g)) for g in groups) / len(groups)

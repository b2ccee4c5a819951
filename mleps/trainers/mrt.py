"""Minimum risk training (Shen et al., 2016) on a sentence-level metric.

Per step, on one batch of B sources:
  S(x)     trainer.num_samples ancestral samples, deduplicated by token ids, plus the
           reference when trainer.include_reference (unless a sample already equals it)
  q(y|x)   p_θ(y|x)^α / Σ_{y' in S(x)} p_θ(y'|x)^α    α = trainer.sharpness
  risk     mean over sources of Σ_{y in S(x)} q(y|x)·cost(y), cost = the sentence task loss
           (for a metric: 1 - metric(y, refs)/100)
  loss     risk + trainer.mle_mix · cross-entropy

The gradient flows through q only (the costs are constants): it moves probability mass
within S(x) towards its low-cost members. α is small (Shen et al.: 0.005) because log p is a
sum over tokens: with α = 1, q would be nearly one-hot on the likeliest candidate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mleps.decoding import decoded_batch
from mleps.errors import UserError
from mleps.trainers.base import Shard, register_rule
from mleps.trainers.sequences import (SequenceSamplingConfig, SequenceSamplingRule,
                                      distinct_per_source, pad_rows, sample, sequence_log_probs, trim)


def candidate_sets(samples: list[tuple[int, ...]], references: list[tuple[int, ...]] | None,
                   num_samples: int) -> list[list[tuple[int, ...]]]:
    """Each source's distinct samples in order of first appearance, then its reference if new."""
    sets = []
    for i in range(0, len(samples), num_samples):
        extra = [references[i // num_samples]] if references is not None else []
        sets.append(list(dict.fromkeys(samples[i:i + num_samples] + extra)))
    return sets


def expected_risk(log_probs: torch.Tensor, costs: torch.Tensor, set_sizes: list[int],
                  sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(risk averaged over sources, q as a (sources, largest set) matrix with zeros past each set).
    Candidates are grouped by source, in order."""
    # Pad each source's candidates to one row; -inf scores get q = 0 and contribute no cost.
    scores = torch.nn.utils.rnn.pad_sequence(torch.split(sharpness * log_probs, set_sizes), batch_first=True,
                                             padding_value=float("-inf"))
    q = scores.softmax(1)
    padded_costs = torch.nn.utils.rnn.pad_sequence(torch.split(costs, set_sizes), batch_first=True)
    risk = (q * padded_costs).sum(1).mean()
    return risk, q


@dataclass
class MRTConfig(SequenceSamplingConfig):
    name: str = "mrt"
    sharpness: float = 0.005
    include_reference: bool = True


@register_rule
class MinimumRiskTraining(SequenceSamplingRule):
    name, schema = "mrt", MRTConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos[0]

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.sharpness > 0:
            raise UserError(f"trainer.sharpness={cfg.sharpness}: use a number > 0")

    def reference_ids(self, batch: dict, start_id: int) -> list[tuple[int, ...]]:
        """The training targets as outputs: decoder start token, then the labels through EOS."""
        return [(start_id, *(t for t in row if t != -100)) for row in batch["labels"].tolist()]

    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        cfg, k = self.cfg, self.cfg.num_samples
        refs = batch["references"]

        # -- candidates: distinct samples (+ the reference)
        t0 = time.perf_counter()
        ids = sample(self.unwrapped, batch, num_samples=k, temperature=cfg.sample_temperature,
                     max_new_tokens=self.max_new_tokens(batch), seed=self.step_seed(step, shard.index))
        samples = trim(ids, self.eos)
        references = self.reference_ids(batch, start_id=samples[0][0]) if cfg.include_reference else None
        sets = candidate_sets(samples, references, k)
        set_sizes = [len(s) for s in sets]
        owned = [(i, c) for i, s in enumerate(sets) for c in s]  # (source, candidate), grouped by source
        candidates, lengths = pad_rows([c for _, c in owned], self.pad_id, ids.device)
        source_index = torch.tensor([i for i, _ in owned], device=ids.device)
        sample_s = time.perf_counter() - t0

        # -- costs: constants of the loss
        t0 = time.perf_counter()
        decoded = decoded_batch(candidates, self.tokenizer, self.eos, [refs[i] for i, _ in owned], batch=batch,
                                source_index=source_index, lengths=lengths)
        costs = torch.tensor(self.metric.sentence_losses(decoded), dtype=torch.float32, device=ids.device)
        score_s = time.perf_counter() - t0

        # -- risk and its gradient
        t0 = time.perf_counter()
        log_probs, _ = sequence_log_probs(self.model, batch, candidates, source_index, self.eos, lengths)
        risk, q = expected_risk(log_probs, costs, set_sizes, cfg.sharpness)
        # risk is a mean over this batch's sources
        cross_entropy = self.backward_with_mle_mix(batch, shard, risk * len(sets), len(sets))
        loss = risk.detach() + cfg.mle_mix * cross_entropy
        backward_s = time.perf_counter() - t0

        sampled = torch.tensor([c in samples[i * k:(i + 1) * k] for i, c in owned], device=ids.device)
        sample_rewards = 1 - costs[sampled]
        stats = {
            "loss": loss.item(), "risk": risk.item(), "cross_entropy": cross_entropy.item(),
            "reward_mean": sample_rewards.mean().item(), "reward_std": sample_rewards.std(unbiased=False).item(),
            "candidates_per_source": sum(set_sizes) / len(sets), "distinct_per_source": distinct_per_source(samples, k),
            "q_max": q.detach().max(1).values.mean().item(), "log_prob_mean": log_probs.mean().item(),
            "sample_len": sum(len(s) - 1 for s in samples) / len(samples),
            "sample_s": sample_s, "score_s": score_s, "backward_s": backward_s,
        }
        if cfg.include_reference:  # q's mass on the reference, sampled or appended
            is_reference = torch.tensor([c == references[i] for i, c in owned], device=ids.device)
            in_set = torch.arange(q.shape[1], device=q.device) < torch.tensor(set_sizes, device=q.device).unsqueeze(1)
            stats["reference_q"] = q.detach()[in_set][is_reference].sum().item() / len(sets)
        return stats

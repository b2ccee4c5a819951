"""Policy gradient (REINFORCE, Williams 1992) on a sentence-level metric, in the sequence-level
form of Ranzato et al. (2016) and Rennie et al. (2017).

Per step, on one batch of B sources:
  y_1..y_K ~ p_θ(·|x)   ancestral sampling (trainer.sample_temperature; no top-k/top-p)
  r_k                   1 - sentence task loss of y_k (for a metric: metric(y_k, refs) / 100)
  b_k                   trainer.baseline: loo   mean reward of the other K-1 samples of x
                                          greedy  reward of the greedy output (self-critical)
                                          none    0
  loss                  -mean_k (r_k - b_k)·log p_θ(y_k|x) + trainer.mle_mix · cross-entropy

Both baselines are independent of y_k given x, so the estimate stays unbiased; they only cut
its variance. With sample_temperature != 1 the samples come from the tempered distribution
while log p is the model's own: the usual practice, but then the gradient is biased.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mleps.decoding import decoded_batch, generate
from mleps.errors import UserError
from mleps.trainers.base import Shard, register_rule
from mleps.trainers.sequences import (SequenceSamplingConfig, SequenceSamplingRule,
                                      distinct_per_source, sample, sequence_log_probs, trim)

BASELINES = ("loo", "greedy", "none")


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards -> each sample's baseline: the mean reward of the other samples of its source."""
    k = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def standardize(advantages: torch.Tensor) -> torch.Tensor:
    """Advantages scaled to unit root-mean-square over the batch (unit std for loo, whose advantages
    sum to 0 per source): the step no longer depends on the metric's scale or spread. Not centred,
    so the baseline keeps its meaning, and never divides a non-zero advantage by ~0."""
    return advantages / (advantages.square().mean().sqrt() + 1e-8)


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """A surrogate whose gradient is the REINFORCE estimate -mean_n A_n ∇log p(y_n|x_n)."""
    return -(advantages.detach() * log_probs).mean()


@dataclass
class PGConfig(SequenceSamplingConfig):
    name: str = "pg"
    baseline: str = "loo"  # loo | greedy | none
    standardize: bool = False  # unit-RMS advantages over each micro-batch


@register_rule
class PolicyGradient(SequenceSamplingRule):
    name, schema = "pg", PGConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.baseline not in BASELINES:
            raise UserError(f"trainer.baseline={cfg.baseline} is not one of: {', '.join(BASELINES)}")
        if cfg.baseline == "loo" and cfg.num_samples < 2:
            raise UserError("trainer.baseline=loo needs trainer.num_samples >= 2")

    def rewards(self, ids: torch.Tensor, batch: dict, per_source: int) -> torch.Tensor:
        """1 - each output's sentence task loss; row n of `ids` is an output for source n // per_source."""
        source_index = torch.arange(len(batch["references"]), device=ids.device).repeat_interleave(per_source)
        refs = [batch["references"][i] for i in source_index.tolist()]
        losses = self.metric.sentence_losses(decoded_batch(ids, self.tokenizer, self.eos, refs, batch=batch,
                                                           source_index=source_index))
        return 1 - torch.tensor(losses, dtype=torch.float32, device=ids.device)

    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        cfg, k = self.cfg, self.cfg.num_samples
        refs = batch["references"]
        num_sources = len(refs)

        # -- sample K outputs per source (and the greedy output for the self-critical baseline)
        t0 = time.perf_counter()
        ids = sample(self.unwrapped, batch, num_samples=k, temperature=cfg.sample_temperature,
                     max_new_tokens=self.max_new_tokens(batch), seed=self.step_seed(step, shard.index))
        if cfg.baseline == "greedy":
            greedy = generate(self.unwrapped, batch, max_new_tokens=self.max_new_tokens(batch))
        sample_s = time.perf_counter() - t0

        # -- rewards, baseline, advantages: constants of the loss
        t0 = time.perf_counter()
        rewards = self.rewards(ids, batch, k).view(num_sources, k)
        if cfg.baseline == "loo":
            baseline = leave_one_out(rewards)
        elif cfg.baseline == "greedy":
            baseline = self.rewards(greedy, batch, 1).unsqueeze(1).expand(-1, k)
        else:
            baseline = torch.zeros_like(rewards)
        advantages = rewards - baseline
        if cfg.standardize:
            advantages = standardize(advantages)
        score_s = time.perf_counter() - t0

        # -- the surrogate loss and its gradient
        t0 = time.perf_counter()
        source_index = torch.arange(num_sources, device=ids.device).repeat_interleave(k)
        log_probs, lengths = sequence_log_probs(self.model, batch, ids, source_index, self.eos)
        # Means over the global batch: each source's K samples, averaged over sources (Shard).
        pg_loss_sum = reinforce_loss(log_probs, advantages.flatten()) * num_sources
        cross_entropy = self.backward_with_mle_mix(batch, shard, pg_loss_sum, num_sources)
        pg_loss = pg_loss_sum.detach() / num_sources
        loss = pg_loss + cfg.mle_mix * cross_entropy
        backward_s = time.perf_counter() - t0

        return {
            "loss": loss.item(), "pg_loss": pg_loss.item(), "cross_entropy": cross_entropy.item(),
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
            "reward_max": rewards.max(1).values.mean().item(),
            "baseline_mean": baseline.mean().item(), "advantage_std": advantages.std(unbiased=False).item(),
            "log_prob_mean": log_probs.mean().item(), "sample_len": lengths.float().mean().item(),
            "distinct_per_source": distinct_per_source(trim(ids, self.eos), k),
            "sample_s": sample_s, "score_s": score_s, "backward_s": backward_s,
        }

"""Policy gradient (REINFORCE, Williams 1992) on a sentence-level metric, in the sequence-level
form of Ranzato et al. (2016) and Rennie et al. (2017), with GRPO's group advantages and KL
penalty (Shao et al. 2024, DeepSeekMath) as options.

Per step, on one batch of B sources:
  y_1..y_K ~ p_θ(·|x)   ancestral sampling (trainer.sample_temperature; no top-k/top-p)
  r_k                   1 - sentence task loss of y_k (for a metric: metric(y_k, refs) / 100)
  b_k                   trainer.baseline: loo    mean reward of the other K-1 samples of x
                                          group  mean reward of all K samples of x (GRPO)
                                          greedy reward of the greedy output (self-critical)
                                          none   0
  A_k                   (r_k - b_k) / (σ + 1e-4) with σ by trainer.scale_rewards: group  std of x's K
                        rewards; batch  std of the micro-batch's B·K rewards; none  A_k = r_k - b_k
                        (then trainer.standardize: unit RMS over the micro-batch)
  KL_k                  mean over y_k's tokens t of the k3 estimator of KL(p_θ || p_ref),
                        exp(log p_ref(t) - log p_θ(t)) - (log p_ref(t) - log p_θ(t)) - 1, with p_ref
                        the frozen model the phase started from (only built when trainer.kl_coef > 0)
  loss                  mean_k [-A_k·log p_θ(y_k|x) + β·KL_k] + trainer.mle_mix · cross-entropy,
                        β = trainer.kl_coef

loo, greedy and none are independent of y_k given x, so the estimate stays unbiased; they only
cut its variance. The group mean includes r_k itself: its advantage is (K-1)/K of loo's, a
shrunk (biased by that factor) step, as in GRPO. With sample_temperature != 1 the samples come
from the tempered distribution while log p is the model's own: the usual practice, but then the
gradient is biased.

What follows TRL (huggingface/trl, trl/trainer/grpo_trainer.py, GRPOTrainer: the advantages in
`_generate_and_score_completions`, the KL in `_compute_loss`): advantages are r - the group mean,
divided by `std + 1e-4` (torch's unbiased std per group, or over the batch) unless
scale_rewards=none, so a group whose K rewards are equal gets advantages of 0, never NaN; the
per-token k3 KL on the sampled tokens, averaged over each sequence's tokens, then over sequences.
What differs: the policy-gradient term stays the sequence-level REINFORCE above (log p summed over
the output's tokens; TRL's default losses average per token); the batch std is this micro-batch's
(each process, each accumulation step), as for standardize, where TRL gathers the rewards of all
processes first. And there is one update per batch: mleps's loop makes one optimizer step per
`update` (mleps.trainers.base), and several steps on one batch (TRL's num_iterations > 1, with
its clipped ratio π_θ/π_old and epsilon) would bypass the loop's clipping, finiteness check and
schedule. With one update the samples come from π_θ itself, the ratio is 1 and the clipped
objective's gradient is exactly the unclipped one above, so there are no num_iterations/epsilon
options.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from mleps.decoding import decoded_batch, generate
from mleps.errors import UserError
from mleps.trainers.base import Shard, register_rule
from mleps.trainers.sequences import (SequenceSamplingConfig, SequenceSamplingRule, distinct_per_source,
                                      sample, token_log_probs, trim)

BASELINES = ("loo", "group", "greedy", "none")
SCALE_REWARDS = ("none", "group", "batch")
STD_EPSILON = 1e-4  # TRL's: a group of equal rewards gets advantages 0 / (0 + 1e-4) = 0


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards -> each sample's baseline: the mean reward of the other samples of its source."""
    k = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scale_rewards(advantages: torch.Tensor, rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """(B, K) advantages divided by the (unbiased) std of each source's K rewards (group), of all B·K
    rewards (batch), or left as they are (none); + 1e-4 as TRL's GRPOTrainer, so zero spread gives zeros."""
    if scale == "none":
        return advantages
    if scale == "group":
        std = rewards.std(1, keepdim=True)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return advantages / (std + STD_EPSILON)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) token log-probs of the sampled tokens under the policy and the reference, and their mask ->
    each row's mean over its tokens of exp(ref - logp) - (ref - logp) - 1: Schulman's k3, an unbiased,
    never negative estimate of KL(policy || reference) per token when the tokens come from the policy."""
    delta = (ref_log_probs - log_probs).masked_fill(~mask, 0.0)
    per_token = torch.exp(delta) - delta - 1
    return per_token.sum(1) / mask.sum(1).clamp(min=1)


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
    baseline: str = "loo"  # loo | group (GRPO: mean of the K, itself included) | greedy | none
    scale_rewards: str = "none"  # none | group (÷ std of the source's K rewards) | batch (÷ the micro-batch's)
    standardize: bool = False  # unit-RMS advantages over each micro-batch
    kl_coef: float = 0.0  # β of the k3 KL penalty to the phase's start model (0: no frozen copy is made)


@register_rule
class PolicyGradient(SequenceSamplingRule):
    name, schema = "pg", PGConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reference = None
        if self.cfg.kl_coef > 0:  # a second copy of the weights: only when the penalty is on
            start = self.start_model if self.start_model is not None else copy.deepcopy(self.unwrapped)
            self.reference = start.eval().requires_grad_(False)

    @classmethod
    def needs_start_model(cls, cfg) -> bool:
        return cfg.kl_coef > 0

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.baseline not in BASELINES:
            raise UserError(f"trainer.baseline={cfg.baseline} is not one of: {', '.join(BASELINES)}")
        for option in ("baseline", "scale_rewards"):
            if getattr(cfg, option) in ("loo", "group") and cfg.num_samples < 2:
                raise UserError(f"trainer.{option}={getattr(cfg, option)} needs trainer.num_samples >= 2 "
                                f"(got {cfg.num_samples})")
        if cfg.scale_rewards not in SCALE_REWARDS:
            raise UserError(f"trainer.scale_rewards={cfg.scale_rewards} is not one of: {', '.join(SCALE_REWARDS)}")
        if not cfg.kl_coef >= 0:
            raise UserError(f"trainer.kl_coef={cfg.kl_coef}: use a number >= 0 (0: no KL penalty)")

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
        elif cfg.baseline == "group":
            baseline = rewards.mean(1, keepdim=True).expand(-1, k)
        elif cfg.baseline == "greedy":
            baseline = self.rewards(greedy, batch, 1).unsqueeze(1).expand(-1, k)
        else:
            baseline = torch.zeros_like(rewards)
        advantages = scale_rewards(rewards - baseline, rewards, cfg.scale_rewards)
        if cfg.standardize:
            advantages = standardize(advantages)
        score_s = time.perf_counter() - t0

        # -- the surrogate loss and its gradient
        t0 = time.perf_counter()
        source_index = torch.arange(num_sources, device=ids.device).repeat_interleave(k)
        token_lp, mask = token_log_probs(self.model, batch, ids, source_index, self.eos)
        log_probs, lengths = token_lp.sum(1), mask.sum(1)
        # Means over the global batch: each source's K samples, averaged over sources (Shard).
        pg_loss_sum = reinforce_loss(log_probs, advantages.flatten()) * num_sources
        loss_sum, kl_stats = pg_loss_sum, {}
        if self.reference is not None:
            with torch.no_grad(), self.accelerator.autocast():  # the precision the prepared policy runs at
                ref_lp, _ = token_log_probs(self.reference, batch, ids, source_index, self.eos)
            kl = k3_kl(token_lp, ref_lp, mask).mean()
            loss_sum = loss_sum + cfg.kl_coef * kl * num_sources
            kl_stats = {"kl": kl.item()}
        cross_entropy = self.backward_with_mle_mix(batch, shard, loss_sum, num_sources)
        pg_loss = pg_loss_sum.detach() / num_sources
        loss = loss_sum.detach() / num_sources + cfg.mle_mix * cross_entropy
        backward_s = time.perf_counter() - t0

        return {
            "loss": loss.item(), "pg_loss": pg_loss.item(), "cross_entropy": cross_entropy.item(),
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
            "reward_max": rewards.max(1).values.mean().item(),
            "baseline_mean": baseline.mean().item(), "advantage_std": advantages.std(unbiased=False).item(),
            "log_prob_mean": log_probs.mean().item(), "sample_len": lengths.float().mean().item(),
            "distinct_per_source": distinct_per_source(trim(ids, self.eos), k),
            **kl_stats,
            "sample_s": sample_s, "score_s": score_s, "backward_s": backward_s,
        }

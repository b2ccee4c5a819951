"""MLE-guided parameter search (Welleck & Cho, AAAI 2021) as an update rule.

Per step, on one batch:
  C(θ)      task_loss of the batch decoded with θ: 1 - metric/100, pooled over the batch
            (metric.level=corpus) or the mean of sentence scores (level=sentence)
  g         guide: the token cross-entropy gradient, clipped to trainer.guide_max_norm
  Δ_k       K perturbations from mleps.search: a mixture of N(0, σ²) and N(μ, σ²)
  C(θ+Δ_k)  decode the batch with each perturbed model and score it
  Δθ*       Σ_k w_k Δ_k with w_k ∝ exp(-[C(θ+Δ_k) - C(θ)]/α) / q(Δ_k)

Where the guided component is centred (`trainer.guide`) matters more than anything else:
  scaled     μ = -η·g (η = trainer.guide_scale). The original code uses η = 1 with g clipped
             to norm 1, which on a trained model is a step so large that every guided sample
             decodes garbage and gets zero weight (MGS degenerates to random search).
  optimizer  μ = the optimizer's own next step on g (AdamW with its moments), so guided
             samples are exactly "what MLE would do now" and noise is relative to that step.
             The moments are advanced with g as MLE would; Δθ* is then added to θ directly
             (apply=sgd), since it already has the size of an optimizer step.

Perturbations are applied in place to the live parameters, regenerated from their seeds,
and θ is restored bit-exactly from one backup after each decode (trainer.perturb=inplace);
trainer.perturb=copy deep-copies the model per sample as the original code does.
"""
from __future__ import annotations

import copy
import time

import torch

from mleps.decoding import generate, to_texts
from mleps.errors import UserError
from mleps.search import SearchConfig, apply_perturbation_, draw_samples, importance_weights, write_update_
from mleps.trainers.base import UpdateRule, token_cross_entropy


def search_config(cfg) -> SearchConfig:
    try:
        return SearchConfig(
            num_samples=cfg.num_samples, density=cfg.density, temperature=cfg.temperature, beta=cfg.beta,
            proposal=cfg.proposal, mixture_weight=cfg.mixture_weight, noise_scale=cfg.noise_scale,
            noise_mode=cfg.noise_mode, guide_scale=cfg.guide_scale if cfg.guide == "scaled" else 1.0,
        )
    except ValueError as e:
        raise UserError(f"trainer: {e}") from None


class MGS(UpdateRule):
    clip_in_loop = False  # the guide is clipped before the search; Δθ* is used as it comes

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = self.cfg
        self.search = search_config(cfg)
        choices = {"guide": ("scaled", "optimizer"), "perturb": ("inplace", "copy"),
                   "apply": ("optimizer", "sgd"), "decode": ("greedy", "sample")}
        for key, allowed in choices.items():
            if cfg[key] not in allowed:
                raise UserError(f"trainer.{key}={cfg[key]} is not one of: {', '.join(allowed)}")
        if self.accelerator.num_processes > 1:
            # Ranks would perturb and update independently and drift apart: refuse rather than diverge.
            raise UserError("trainer=mgs runs in one process for now: launch it without --num_processes")
        if cfg.guide == "optimizer" and cfg.apply != "sgd":
            raise UserError("trainer.guide=optimizer already advances the optimizer: use it with trainer.apply=sgd")
        self.optimizer = None  # set by the loop
        self._backup: list[torch.Tensor] | None = None  # one copy of θ, allocated once, reused every step

    # -- helpers -----------------------------------------------------------------
    def _params(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _task_loss(self, model, batch: dict, seed: int) -> tuple[float, float]:
        """(C, decode seconds) for the batch decoded by `model`."""
        t0 = time.perf_counter()
        sample = self.cfg.decode == "sample"
        if sample:  # every perturbed model sees the same sampling noise
            torch.manual_seed(seed)
        ids = generate(model, batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=sample)
        hyps = to_texts(self.tokenizer, ids)
        decode_s = time.perf_counter() - t0
        return self.metric.task_loss(hyps, batch["references"]), decode_s

    def _snapshot(self, params) -> list[torch.Tensor]:
        if self._backup is None or any(b.shape != p.shape for b, p in zip(self._backup, params)):
            self._backup = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            for b, p in zip(self._backup, params):
                b.copy_(p)
        return self._backup

    def _optimizer_step_as_guide(self, params, backup) -> None:
        """Replace each .grad (= g) by -(the optimizer's step on g), and leave θ unchanged."""
        self.optimizer.step()  # advances the moments with g, as an MLE step would
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.grad.copy_(b - p)  # μ = -η·guide = the step itself (η = 1)
                p.copy_(b)

    # -- the step -------------------------------------------------------------------
    def step(self, batch: dict, step: int) -> dict[str, float]:
        cfg, model = self.cfg, self.unwrapped
        params = self._params(model)
        times = dict.fromkeys(("gradient_s", "perturb_s", "decode_s", "score_s", "update_s"), 0.0)
        seed = self.step_seed(step)

        # -- guide: the cross-entropy gradient on the same batch
        t0 = time.perf_counter()
        model.train()
        cross_entropy, _ = token_cross_entropy(model, batch, cfg.label_smoothing)
        self.accelerator.backward(cross_entropy)
        for p in params:
            if p.grad is None:  # e.g. parameters the loss does not reach
                p.grad = torch.zeros_like(p)
        guide_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.guide_max_norm or float("inf")))
        if not torch.isfinite(torch.tensor(guide_norm)):
            return {"loss": float("nan"), "cross_entropy": cross_entropy.item(), "guide_norm": guide_norm}
        guide = [p.grad for p in params]
        backup = self._snapshot(params) if cfg.perturb == "inplace" or cfg.guide == "optimizer" else None
        if cfg.guide == "optimizer":
            self._optimizer_step_as_guide(params, backup)
        times["gradient_s"] = time.perf_counter() - t0

        # -- decode with θ
        base_loss, times["decode_s"] = self._task_loss(model, batch, seed)

        # -- perturb, decode, score: K times
        generator = torch.Generator().manual_seed(seed)
        samples = draw_samples(self.search, generator)
        losses, stats = [], []
        for sample in samples:
            t0 = time.perf_counter()
            if cfg.perturb == "copy":
                perturbed = copy.deepcopy(model)
                target = self._params(perturbed)
            else:
                perturbed, target = model, params
            stats.append(apply_perturbation_(target, guide, self.search, sample))
            times["perturb_s"] += time.perf_counter() - t0
            loss, decode_s = self._task_loss(perturbed, batch, seed)
            losses.append(loss)
            times["decode_s"] += decode_s
            t0 = time.perf_counter()
            if cfg.perturb == "copy":
                del perturbed, target
            else:
                with torch.no_grad():
                    for p, b in zip(params, backup):
                        p.copy_(b)
            times["perturb_s"] += time.perf_counter() - t0

        # -- weight
        t0 = time.perf_counter()
        log_weights, info = importance_weights(self.search, samples, losses, base_loss, stats)
        times["score_s"] = time.perf_counter() - t0

        # -- update: Δθ* into .grad, negated so that a descending optimizer moves along Δθ*
        t0 = time.perf_counter()
        update_norm = write_update_(guide, guide, self.search, samples, log_weights)
        with torch.no_grad():
            for g in guide:
                g.neg_()
        times["update_s"] = time.perf_counter() - t0

        return {
            "loss": base_loss, "task_loss": base_loss, "cross_entropy": cross_entropy.item(),
            "perturbed_loss_min": min(losses), "perturbed_loss_mean": sum(losses) / len(losses),
            "best_improvement": base_loss - min(losses),
            "ess": info["ess"], "weight_entropy": info["weight_entropy"], "guided_weight": info["guided_weight"],
            "noise_norm": info["noise_norm"], "update_norm": update_norm, "guide_norm": guide_norm, **times,
        }

    def apply(self, optimizer) -> None:
        if self.cfg.apply == "optimizer":
            optimizer.step()
            return
        with torch.no_grad():  # θ += sgd_scale · Δθ*  (.grad holds -Δθ*)
            for p in self._params(self.unwrapped):
                p.add_(p.grad, alpha=-self.cfg.sgd_scale)

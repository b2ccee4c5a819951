"""Measurements of MGS's weights, installed into the rule as per-step probes (mleps.trainers.mgs.SearchProbe).

They are the lab's, not the method's: `python -m mleps_lab.train` is `python -m mleps.train` with these
knobs added to trainer=mgs's schema and the probes installed by a loop callback.

  trainer.diagnose_every=N   every N steps, before the update is written, the step's samples are also
                             scored on a fixed held-out batch (the first trainer.diagnose_examples
                             validation rows, decoded whole by every process): their rank agreement
                             with the training batch, and the held-out task loss after the step taken
                             (θ + Δθ*) and after the blind step (uniform weights over the same samples).
                             θ is restored bit for bit and nothing the update reads is touched.
  trainer.oracle_rows=[a,b]  a measurement, not a method: the weights come from the samples' task losses
                             on validation rows a..b (decoded whole by every process) instead of the
                             training batch's: a stand-in for the best any weighting of these proposals
                             could do. Checkpoints must be selected on other rows (refused at start).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from mleps.config import register_configs
from mleps.data import completion_pairs, has_split, load_split, tokenize
from mleps.errors import UserError
from mleps.loop import Callback
from mleps.search import apply_perturbation_, spearman
from mleps.trainers.mgs import MGSConfig, SearchProbe


@dataclass
class MGSProbeConfig(MGSConfig):
    """trainer=mgs with the lab's probes (trainer=mgs's schema in `python -m mleps_lab.train`)."""

    diagnose_every: Optional[int] = None  # every N steps: held-out rank agreement, taken vs blind step (null = off)
    diagnose_examples: int = 64  # the first N validation examples, the diagnostic's fixed held-out batch
    # A measurement, not a method: weigh the samples by their task loss on validation rows [start, stop)
    oracle_rows: Optional[List[int]] = None


def register_probe_configs() -> None:
    """The library's schemas, with trainer=mgs's (and its presets') extended by the probes' keys."""
    register_configs(trainer_schemas={"mgs": MGSProbeConfig})


def check_probe_config(cfg) -> None:
    """The probes' values (cfg: the whole training config)."""
    t = cfg.trainer
    every, rows = t.get("diagnose_every"), t.get("oracle_rows")
    if every is not None and every < 1:
        raise UserError(f"trainer.diagnose_every={every}: use 1 or more, or null (off)")
    if t.get("diagnose_examples", 1) < 1:
        raise UserError(f"trainer.diagnose_examples={t.diagnose_examples}: use 1 or more")
    if rows is not None and (len(rows) != 2 or not 0 <= rows[0] < rows[1]):
        raise UserError(f"trainer.oracle_rows={list(rows)}: use [start, stop] with 0 <= start < stop "
                        "(validation rows), or null (off)")
    if every and not has_split(cfg.data, "validation"):
        raise UserError("trainer.diagnose_every scores a held-out slice of the validation set: "
                        "it needs data.validation_file (or set trainer.diagnose_every=null)")
    if rows is not None and not has_split(cfg.data, "validation"):
        raise UserError("trainer.oracle_rows weighs the samples on validation rows: "
                        "it needs data.validation_file (or set trainer.oracle_rows=null)")


def held_out_losses(rule, search, batch: dict, seed: int, theta) -> tuple[float, list[float]]:
    """(C(θ), [C(θ+Δ_k)]) on a held-out batch; search.params hold θ (a copy of it in `theta`) and are
    restored from `theta` bit for bit after each sample."""
    model, params = search.model, search.params
    base, losses = rule.task_loss_on(model, batch, seed), []
    for sample in search.samples:
        apply_perturbation_(params, search.guide, rule.search, sample, search.noise_scales)
        losses.append(rule.task_loss_on(model, batch, seed))
        with torch.no_grad():
            torch._foreach_copy_(params, theta)
    return base, losses


class HeldOutDiagnostic(SearchProbe):
    """trainer.diagnose_every: rank agreement and the taken-vs-blind step on a fixed held-out batch."""

    def __init__(self, batch: dict, every: int):
        self.batch, self.every = batch, every

    def measure(self, rule, search, log_weights) -> dict[str, float]:
        if (search.step + 1) % self.every:
            return {}
        t0 = time.perf_counter()
        model, params, samples = search.model, search.params, search.samples
        seed = rule.step_seed(search.step, 10_007)  # decode=sample: the same noise for every parameter set
        theta = rule.snapshot(params)  # θ (params hold θ here, whatever the guide mode)
        base, held_out = held_out_losses(rule, search, self.batch, seed, theta)
        scale = rule.cfg.sgd_scale if rule.cfg.apply == "sgd" else 1.0
        steps = {}
        uniform = torch.full((len(samples),), -math.log(len(samples)), dtype=torch.float64)
        for name, weights in (("taken", log_weights), ("blind", uniform)):
            rule.write_update(params, search.guide, samples, weights, search.noise_scales)  # params ← Δθ
            with torch.no_grad():
                torch._foreach_mul_(params, scale)
                torch._foreach_add_(params, theta)  # params ← θ + scale·Δθ
            steps[name] = rule.task_loss_on(model, self.batch, seed)
            with torch.no_grad():
                torch._foreach_copy_(params, theta)
        excess = np.asarray(held_out) - base
        return {
            "diag_rank_correlation": spearman(search.losses, held_out),
            "diag_heldout_loss": base, "diag_heldout_spread_std": float(excess.std()),
            "diag_heldout_spread_range": float(excess.max() - excess.min()),
            "diag_taken_loss": steps["taken"], "diag_blind_loss": steps["blind"],
            "diag_taken_minus_blind": steps["taken"] - steps["blind"],
            "diagnose_s": time.perf_counter() - t0,
        }


class OracleWeights(SearchProbe):
    """trainer.oracle_rows: the weights from the samples' task losses on held-out rows."""

    def __init__(self, batch: dict):
        self.batch = batch

    def weigh(self, rule, search):
        t0 = time.perf_counter()
        # the decodes left θ in params; the step's backup holds it when the step keeps one
        theta = search.theta if search.theta is not None else rule.snapshot(search.params)
        base, losses = held_out_losses(rule, search, self.batch, rule.step_seed(search.step, 20_011), theta)
        return base, losses, {"oracle_rank_correlation": spearman(search.losses, losses), "oracle_task_loss": base,
                              "oracle_best_improvement": base - min(losses), "oracle_s": time.perf_counter() - t0}


class MGSProbes(Callback):
    """The loop callback that installs the probes the trainer config asks for into the main phase's rule."""

    def check_config(self, cfg) -> None:
        check_probe_config(cfg)

    def on_setup(self, loop) -> None:
        rows = loop.cfg.trainer.get("oracle_rows")
        self.oracle_tokenized = oracle_rows(loop, rows) if rows is not None else None

    def probes(self, loop, phase) -> list:
        tcfg = phase.trainer
        probes = []
        if tcfg.get("diagnose_every") and loop.val_tokenized is not None:
            batch = loop.on_device(loop.collate(loop.val_tokenized[:tcfg.diagnose_examples]))
            probes.append(HeldOutDiagnostic(batch, tcfg.diagnose_every))
        if tcfg.get("oracle_rows") is not None:
            probes.append(OracleWeights(loop.on_device(loop.collate(self.oracle_tokenized[:]))))
        return probes


def oracle_rows(loop, rows):
    """trainer.oracle_rows: validation rows [start, stop), tokenized, none of them among the rows that
    select checkpoints (the first data.max_eval_examples)."""
    start, stop = rows
    cfg, selecting = loop.cfg, len(loop.val_ds)
    if start < selecting:
        raise UserError(f"trainer.oracle_rows={list(rows)} overlaps the {selecting} validation rows that select "
                        f"checkpoints: start at {selecting} or later, or lower data.max_eval_examples to {start}")
    whole = load_split(OmegaConf.merge(cfg.data, {"max_eval_examples": None}), "validation")
    if cfg.data.task == "completion":
        whole = completion_pairs(whole, loop.tokenizer, cfg.data, "validation")
    if stop > len(whole):
        raise UserError(f"trainer.oracle_rows={list(rows)}: the validation set has {len(whole)} rows; "
                        f"stop at {len(whole)} or fewer")
    return tokenize(whole.select(range(start, stop)), loop.tokenizer, cfg.data, loop.source_prefix)

"""MGS levers: each option changes what it says and nothing else. The held-out
diagnostics and oracle weights are the lab's probes: tests/test_lab_probes.py."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from mleps.config import MGSConfig
from mleps.errors import UserError
from mleps.trainers import rule_class
from mleps.trainers.base import token_cross_entropy
from test_mgs import make_batch, mgs_rule, params_of, record_decoded_parameters, tiny_model, warmed, word_tokenizer

torch.set_num_threads(1)

# A briefly warmed model and a step size large enough that perturbed decodes differ (as in test_mgs).
WARM = dict(guide="optimizer", apply="sgd", lr=3e-3, num_samples=4, temperature=0.003)


@pytest.fixture(scope="module")
def warm():
    model, tokenizer, batch = warmed(60)
    return tokenizer, {k: v.clone() for k, v in model.state_dict().items()}, batch


def fresh(warm, **overrides):
    tokenizer, state, batch = warm
    model = tiny_model()
    model.load_state_dict(state)
    rule = mgs_rule(model, tokenizer, **{**WARM, **overrides})
    return model, rule, batch


def held_out(tokenizer, model):
    from test_mgs import pairs
    from mleps.data import Collator

    src, tgt = pairs(12, seed=5)
    rows = {"input_ids": tokenizer(src)["input_ids"], "labels": tokenizer(text_target=tgt)["input_ids"],
            "source": src, "references": [[t] for t in tgt]}
    return Collator(tokenizer, model)(rows)


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_target_ess_sets_the_temperature_each_step(warm):
    model, rule, batch = fresh(warm, num_samples=8, target_ess=0.5)
    stats = rule.step(batch, step=0)
    assert stats["loss_spread_range"] > 0
    assert stats["ess_share"] == pytest.approx(0.5, abs=1e-6)
    assert stats["temperature"] != WARM["temperature"]


def test_antithetic_samples_are_mirror_images(warm, monkeypatch):
    model, rule, batch = fresh(warm, antithetic=True)
    theta = params_of(model)
    seen = record_decoded_parameters(rule, monkeypatch)
    rule.step(batch, step=0)
    d1 = [a - t for a, t in zip(seen[1], theta)]
    d2 = [a - t for a, t in zip(seen[2], theta)]
    assert max(float((a + b).abs().max()) for a, b in zip(d1, d2)) < 1e-6  # zero-centred pair: Δ, -Δ
    assert max(float(a.abs().max()) for a in d1) > 1e-4


def test_line_search_samples_are_scaled_guided_steps(warm, monkeypatch):
    scales = [0.5, 1.0, 2.0]
    model, rule, batch = fresh(warm, line_search_scales=scales)
    theta = params_of(model)
    seen = record_decoded_parameters(rule, monkeypatch)
    stats = rule.step(batch, step=0)
    assert len(seen) == 1 + 4 + 3
    half, one, two = ([a - t for a, t in zip(seen[k], theta)] for k in (5, 6, 7))
    for h, o, w in zip(half, one, two):
        assert torch.allclose(2 * h, o, atol=1e-7) and torch.allclose(2 * o, w, atol=1e-7)
    assert 0.0 <= stats["line_search_weight"] <= stats["guided_weight"] <= 1.0


@pytest.mark.parametrize("guide_params", ["all", "perturbed"])
def test_perturb_params_moves_only_the_chosen_tensors(warm, monkeypatch, guide_params):
    model, rule, batch = fresh(warm, perturb_params="norms_biases", guide_params=guide_params, proposal="guided",
                               guide="scaled", guide_scale=0.1, apply="optimizer")
    theta = params_of(model)
    seen = record_decoded_parameters(rule, monkeypatch)
    stats = rule.step(batch, step=0)
    for p, a, t in zip(model.parameters(), seen[1], theta):
        assert torch.equal(a, t) != (p.dim() == 1), "the noise moves exactly the 1-d tensors"
    # the guide g: the clipped cross-entropy gradient of the batch, computed again here
    reference, _, _ = fresh(warm)
    loss, tokens = token_cross_entropy(reference, batch)
    (loss / tokens).backward()
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    for p, r in zip(model.parameters(), reference.parameters()):
        if p.dim() > 1 and p.requires_grad:  # outside the search: guided samples only -> .grad = -Δθ* = η g, or 0
            g = r.grad if r.grad is not None else torch.zeros_like(r)
            expected = 0.1 * g if guide_params == "all" else torch.zeros_like(g)
            assert torch.allclose(p.grad, expected, atol=1e-7)
    assert stats["guided_weight"] == pytest.approx(1.0)


def test_scoring_batch_size_decodes_more_rows_than_the_guide_uses(warm, monkeypatch):
    tokenizer, _, _ = warm
    model, rule, _ = fresh(warm, batch_size=8, scoring_batch_size=16)
    assert rule.rows_per_micro_batch == 16
    batch = make_batch(tokenizer, model, n=16)
    rows = []
    real = rule._task_stats
    monkeypatch.setattr(rule, "_task_stats", lambda m, b, s: (rows.append(len(b["references"])), real(m, b, s))[1])
    stats = rule.step(batch, step=0)
    assert rows == [16] * 5
    head = {k: v[:8] for k, v in batch.items()}
    loss, tokens = token_cross_entropy(model, head)
    assert stats["cross_entropy"] == pytest.approx(float(loss.detach()) / tokens, rel=1e-6)


def test_rank_weighting_depends_on_the_order_of_losses_only(warm, monkeypatch):
    """A monotone transform of the task loss (10·C³) leaves the rank-weighted update unchanged;
    the Boltzmann-weighted one changes (the control)."""
    updates = {}
    for weighting in ("rank", "boltzmann"):
        for transform in (False, True):
            model, rule, batch = fresh(warm, weighting=weighting, temperature=0.3)
            if transform:
                real = rule.metric.loss_from_stats
                monkeypatch.setattr(rule.metric, "loss_from_stats", lambda stats, real=real: 10 * real(stats) ** 3)
            stats = rule.step(batch, step=0)
            assert stats["loss_spread_range"] > 0
            updates[weighting, transform] = grads(model)
    same = lambda a, b: all(torch.allclose(x, y, atol=1e-9) for x, y in zip(a, b))  # noqa: E731
    assert same(updates["rank", False], updates["rank", True])
    assert not same(updates["boltzmann", False], updates["boltzmann", True])


@pytest.mark.parametrize("override,needle", [
    ({"perturb_params": "everything"}, "perturb_params"), ({"guide_params": "some"}, "guide_params"),
    ({"weighting": "softmax"}, "weighting"), ({"proposal": "best"}, "proposal"), ({"guide": "other"}, "guide"),
])
def test_bad_choices_are_refused_by_the_schema(override, needle):
    """The choices are enums (mleps.choice.Choice): the schema names the key and its values (the CLI's one line)."""
    with pytest.raises(ValidationError, match=rf"(?s)Invalid value .*expected one of .*full_key: {needle}\b"):
        OmegaConf.merge(OmegaConf.structured(MGSConfig), override)


@pytest.mark.parametrize("override,needle", [
    ({"scoring_batch_size": 8, "batch_size": 16}, "trainer.scoring_batch_size"),
    ({"target_ess": 1.5}, "target_ess"),
    ({"antithetic": True, "num_samples": 3}, "even"),
    ({"line_search_scales": [1.0], "density": "exact"}, "line_search_scales"),
])
def test_bad_lever_values_are_one_line_user_errors(override, needle):
    cfg = OmegaConf.merge(OmegaConf.structured(MGSConfig), override)
    with pytest.raises(UserError, match=needle) as info:
        rule_class("mgs").check_config(cfg)
    assert "\n" not in str(info.value)

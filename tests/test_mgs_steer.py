"""What makes MGS steer: weightings with known answers, the blind switch, the task-aware guide
(best_sample) and the control task losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mleps.decoding import DecodedBatch
from mleps.losses import build_task_loss
from mleps.search import PerturbationStats, SearchConfig, draw_samples, importance_weights
from mleps.trainers.mgs import per_row_stats
from test_mgs import mgs_rule, warmed

torch.set_num_threads(1)


def weights_of(config: SearchConfig, losses, base=0.5) -> np.ndarray:
    samples = draw_samples(config, torch.Generator().manual_seed(0))
    stats = [PerturbationStats(1.0, 0.0, 1.0, 1.0, 0.0, 1.0)] * len(samples)
    log_w, _ = importance_weights(config, samples, losses, base, stats)
    return log_w.exp().numpy()


def test_uniform_weighting_ignores_losses_temperature_and_target_ess():
    for extra in ({}, {"target_ess": 0.25}, {"temperature": 1e-6}):
        w = weights_of(SearchConfig(num_samples=4, weighting="uniform", density="none", **extra), [0.1, 0.9, 0.3, 5.0])
        np.testing.assert_allclose(w, 0.25, atol=1e-12)


def test_zscore_weights_do_not_depend_on_the_loss_scale_or_shift():
    config = SearchConfig(num_samples=4, weighting="zscore", temperature=0.5, density="none")
    losses = np.array([0.30, 0.31, 0.29, 0.35])
    a = weights_of(config, losses)
    b = weights_of(config, 1000 * losses + 7)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    z = (losses - losses.mean()) / losses.std()
    expected = np.exp(-z / 0.5) / np.exp(-z / 0.5).sum()
    np.testing.assert_allclose(a, expected, rtol=1e-9)
    assert a.argmax() == 2  # the lowest loss weighs most


def test_zscore_of_equal_losses_is_uniform():
    w = weights_of(SearchConfig(num_samples=4, weighting="zscore", temperature=0.1, density="none"), [0.2] * 4)
    np.testing.assert_allclose(w, 0.25, atol=1e-12)


def decoded(texts, refs):
    return DecodedBatch(texts=texts, token_ids=[[1]] * len(texts), ended_with_eos=[True] * len(texts),
                        references=[[r] for r in refs])


def test_length_target_and_banned_word_losses():
    d = decoded(["a man runs", "the dog", "A cat"], ["x y z w"] * 3)
    assert build_task_loss("length", "sentence", target=0.7).loss(d) == pytest.approx((0.05 + 0.2 + 0.2) / 3)
    assert build_task_loss("length", "corpus", target=0.7).loss(d) == pytest.approx(abs(7 / 12 - 0.7))
    assert build_task_loss("length", "corpus").loss(d) == pytest.approx(abs(7 / 12 - 1))  # default target 1
    assert build_task_loss("banned", "corpus", word="a").loss(d) == pytest.approx(2 / 3)  # "A cat" counts, "man" not
    for bad in ({"target": 0.0}, {"target": float("nan")}, {"target": -1.0}):
        with pytest.raises(ValueError, match="target"):
            build_task_loss("length", "corpus", **bad)
    with pytest.raises(ValueError, match="one word"):
        build_task_loss("banned", "corpus", word="a b")


def test_per_row_statistics_add_up_to_the_batch():
    d = decoded(["a man runs", "the dog", "A cat"], ["x y z w", "x y", "x"])
    loss = build_task_loss("length", "corpus", target=0.7)
    np.testing.assert_allclose(per_row_stats(loss, d).sum(0), loss.stats(d))


@pytest.fixture(scope="module")
def warm():
    return warmed(30)


def test_best_sample_targets_lower_the_batch_loss_exactly_as_tracked(warm):
    model, tokenizer, batch = warm
    rule = mgs_rule(model, tokenizer, guide_target="best_sample", guide_samples=4, guide_sample_temperature=1.5)
    rule.metric = build_task_loss("length", "corpus", target=0.5)
    targets, lengths, log, swapped = rule._best_targets(batch, step=0, index=0)
    assert log["guide_batch_loss_after"] <= log["guide_batch_loss_before"]
    assert log["guide_rows_swapped"] > 0  # sampled outputs of other lengths exist and some help
    assert sum(swapped) / len(swapped) == log["guide_rows_swapped"]
    # the tracked loss is the loss of the chosen rows scored together (additive statistics)
    from mleps.decoding import decoded_batch
    chosen = decoded_batch(targets, tokenizer, rule.eos, batch["references"], batch=batch, lengths=lengths)
    assert rule.metric.loss(chosen) == pytest.approx(log["guide_batch_loss_after"], abs=1e-12)


def test_best_sample_guide_steps_and_is_deterministic(warm):
    model, tokenizer, batch = warm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for _ in range(2):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)  # the loop's optimizer.zero_grad
        rule = mgs_rule(model, tokenizer, guide_target="best_sample", guide_mle_mix=0.1,
                        line_search_scales=[1.0, 2.0])
        rule.metric = build_task_loss("length", "corpus", target=0.5)
        out = rule.step(batch, step=1)
        assert math.isfinite(out["loss"]) and "guide_rows_swapped" in out
        # C(θ) reuses the guide's greedy decode: the same loss as decoding θ afresh (step leaves θ as it was)
        assert out["loss"] == rule.task_loss_on(model, batch, seed=0)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert any(float(g.abs().sum()) > 0 for g in grads[0])
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)


def test_improved_rows_only_leaves_the_unimproved_rows_out_of_the_guide(warm):
    model, tokenizer, batch = warm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}
    for rows in ("all", "improved"):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        rule = mgs_rule(model, tokenizer, guide_target="best_sample", guide_rows=rows, guide_sample_temperature=1.5)
        rule.metric = build_task_loss("length", "corpus", target=0.5)
        from mleps.trainers.base import Shard
        objective = rule._best_sample_objective(batch, Shard(), step=0)
        _, _, log, swapped = rule._best_targets(batch, step=0, index=0)
        grads[rows] = (float(objective), sum(swapped))
    assert 0 < grads["improved"][1] < len(batch["references"])  # some rows improved, some not
    assert 0 < grads["improved"][0] < grads["all"][0]  # fewer rows' NLL in the objective
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)

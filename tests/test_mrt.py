"""Tests for trainer=mrt: the risk and its gradient against a hand computation (dedup, sharpness)."""
import math

import pytest
import torch

import mleps.trainers.mrt as mrt
from mleps.config import MRTConfig
from mleps.decoding import to_texts
from test_pg import (  # noqa: F401  (accelerator and one_thread are fixtures)
    EOS, PAD, LengthMetric, accelerator, grads, hand_log_prob, make_batch, make_rule, one_thread, run_train,
    tiny_model, tiny_tokenizer, unpadded_sources)


def test_expected_risk_matches_closed_form():
    log_probs = torch.tensor([-1.0, -2.0, -3.0, -0.5], requires_grad=True)
    costs = torch.tensor([0.2, 0.5, 0.9, 0.4])
    alpha = 0.5
    risk, q = mrt.expected_risk(log_probs, costs, [3, 1], alpha)
    w = [math.exp(alpha * lp) for lp in (-1.0, -2.0, -3.0)]
    q0 = [x / sum(w) for x in w]
    risk0 = sum(a * c for a, c in zip(q0, (0.2, 0.5, 0.9)))
    assert risk.item() == pytest.approx((risk0 + 0.4) / 2, rel=1e-6)
    torch.testing.assert_close(q, torch.tensor([q0, [1.0, 0.0, 0.0]]))
    risk.backward()
    # d risk / d log p_j = alpha · q_j · (c_j - risk of its source) / sources; a lone candidate gets 0.
    expected = [alpha * a * (c - risk0) / 2 for a, c in zip(q0, (0.2, 0.5, 0.9))] + [0.0]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected))


def test_candidate_sets_dedupe_and_add_new_references():
    a, b, ref0, ref1 = (0, 5, 2), (0, 6, 2), (0, 7, 2), (0, 5, 2)
    sets = mrt.candidate_sets([a, a, b, a, b, b], [ref0, ref1], num_samples=3)
    assert sets == [[a, b, ref0], [a, b]]  # source 1's reference is its sample a
    assert mrt.candidate_sets([a, a, b, a], None, num_samples=2) == [[a], [b, a]]


# Source 0: three samples, two equal once trimmed at EOS, plus its reference: 3 candidates.
# Source 1: a sample cut off without EOS (padded later), and one equal to its reference.
FIXED_SAMPLES = torch.tensor([
    [PAD, 5, 6, EOS, PAD, PAD, PAD],
    [PAD, 5, 6, EOS, PAD, PAD, PAD],
    [PAD, 8, EOS, PAD, PAD, PAD, PAD],
    [PAD, 9, 9, 9, 9, 9, 9],
    [PAD, 14, 15, 16, EOS, PAD, PAD],
    [PAD, 9, 9, 9, 9, 9, 9],
])
SOURCES = ["w3 w4 w5", "w6 w7"]
TARGETS = ["w12 w13 w4 w5 w6 w7 w8", "w14 w15 w16"]  # reference 0 is longer than any sample


@pytest.mark.parametrize("sharpness", [0.3, 1.0])
def test_risk_and_gradient_equal_hand_computation(monkeypatch, accelerator, sharpness):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model, SOURCES, TARGETS)
    monkeypatch.setattr(mrt, "sample", lambda *a, **kw: FIXED_SAMPLES.clone())
    rule = make_rule(mrt.MinimumRiskTraining, MRTConfig, tokenizer, model, LengthMetric(), accelerator,
                     num_samples=3, sharpness=sharpness, include_reference=True)
    model.train()
    stats = rule.step(batch, step=0)
    autograd = grads(model)

    # By hand: the candidate sets written out, one forward per candidate, q ∝ p^α by exp and sum.
    reference0 = [PAD, *tokenizer(text_target=TARGETS[0])["input_ids"]]
    candidate_sets = [
        [[PAD, 5, 6, EOS], [PAD, 8, EOS], reference0],
        [[PAD, 9, 9, 9, 9, 9, 9], [PAD, 14, 15, 16, EOS]],
    ]
    model.zero_grad()
    sources = unpadded_sources(batch)
    risks, ref_q = [], 0.0
    for i, candidates in enumerate(candidate_sets):
        costs = [1 - s / 100 for s in LengthMetric().sentence_scores(to_texts(tokenizer, candidates), None)]
        weights = [torch.exp(sharpness * hand_log_prob(model, sources[i], c)) for c in candidates]
        total = sum(weights)
        risks.append(sum(w / total * c for w, c in zip(weights, costs)))
        ref_q += (weights[-1] / total).detach().item()
    hand_risk = sum(risks) / len(risks)
    hand_risk.backward()
    by_hand = grads(model)

    assert stats["candidates_per_source"] == pytest.approx(2.5)
    assert stats["distinct_per_source"] == pytest.approx(2.0)
    assert stats["risk"] == pytest.approx(hand_risk.item(), rel=1e-5)
    assert stats["reference_q"] == pytest.approx(ref_q / 2, rel=1e-5)
    assert sum(float(g.abs().sum()) for g in by_hand) > 1e-4
    for a, h in zip(autograd, by_hand):
        torch.testing.assert_close(a, h, atol=1e-7, rtol=1e-4)


def test_without_reference_only_samples_compete(monkeypatch, accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model, SOURCES, TARGETS)
    monkeypatch.setattr(mrt, "sample", lambda *a, **kw: FIXED_SAMPLES.clone())
    rule = make_rule(mrt.MinimumRiskTraining, MRTConfig, tokenizer, model, LengthMetric(), accelerator,
                     num_samples=3, include_reference=False)
    stats = rule.step(batch, step=0)
    assert stats["candidates_per_source"] == pytest.approx(2.0)
    assert "reference_q" not in stats
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())


@pytest.mark.slow
def test_train_mrt_end_to_end(tmp_path):
    done = run_train("mrt", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "mrt" / "metrics.jsonl").read_text()
    assert '"risk"' in log and '"candidates_per_source"' in log

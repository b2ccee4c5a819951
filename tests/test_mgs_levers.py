"""MGS levers and diagnostics (issue #14): each option changes what it says and nothing else;
the diagnostic leaves θ, the update and the training trajectory untouched."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CLI, assert_user_error, read_jsonl, run_main
from mleps.config import MGSConfig
from mleps.errors import UserError
from mleps.trainers import rule_class
from mleps.trainers.base import token_cross_entropy
from test_mgs import make_batch, mgs_rule, mle_warm, params_of, record_decoded_parameters, tiny_model, word_tokenizer

torch.set_num_threads(1)

# A briefly warmed model and a step size large enough that perturbed decodes differ (as in test_mgs).
WARM = dict(guide="optimizer", apply="sgd", lr=3e-3, num_samples=4, temperature=0.003)


@pytest.fixture(scope="module")
def warm():
    tokenizer = word_tokenizer()
    model = tiny_model()
    batch = make_batch(tokenizer, model)
    mle_warm(model, tokenizer, batch, steps=60)
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


def test_diagnostics_change_nothing_and_score_the_step_taken(warm, monkeypatch):
    tokenizer = warm[0]
    results = {}
    for diagnose in (None, 1):
        model, rule, batch = fresh(warm, diagnose_every=diagnose)
        rule.diagnostic_batch = held_out(tokenizer, model)
        theta = params_of(model)
        stats = rule.step(batch, step=2)
        assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta)), "θ restored bit for bit"
        results[diagnose] = (grads(model), stats)
    (plain, _), (diagnosed, stats) = results[None], results[1]
    assert all(torch.equal(a, b) for a, b in zip(plain, diagnosed)), "the update is the same with diagnostics on"
    assert "diag_rank_correlation" not in results[None][1]
    assert -1.0 <= stats["diag_rank_correlation"] <= 1.0
    assert stats["diag_heldout_spread_range"] > 0, "the step is large enough to change held-out decodes"
    # the taken step's held-out loss is the loss of θ + Δθ* (apply=sgd, .grad = -Δθ*), computed here by hand
    model, rule, batch = fresh(warm)
    rule.step(batch, step=2)
    rule.apply(rule.optimizer)
    by_hand = rule.metric.loss_from_stats(rule._task_stats(model, held_out(tokenizer, model), 0)[0])
    assert stats["diag_taken_loss"] == pytest.approx(by_hand, abs=1e-12)
    assert stats["diag_taken_minus_blind"] == pytest.approx(stats["diag_taken_loss"] - stats["diag_blind_loss"])


def test_oracle_rows_weigh_the_samples_by_their_held_out_losses(warm, monkeypatch):
    """Weighted on the training batch itself, the oracle is the plain rule bit for bit; on other rows its
    weights are importance_weights of those rows' losses (recomputed here), and θ is left as it was."""
    from mleps.trainers import mgs as mgs_module

    tokenizer = warm[0]
    model, rule, batch = fresh(warm)
    plain_stats = rule.step(batch, step=2)
    plain = grads(model)
    model, rule, batch = fresh(warm, oracle_rows=[0, 12])
    rule.oracle_batch = batch
    rule.step(batch, step=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(model)))

    model, rule, batch = fresh(warm, oracle_rows=[0, 12])
    rule.oracle_batch = held_out(tokenizer, model)
    theta = params_of(model)
    stats = rule.step(batch, step=2)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta)), "θ restored bit for bit"
    assert not all(torch.allclose(a, b) for a, b in zip(plain, grads(model))), "other rows, other weights"
    assert stats["task_loss"] == plain_stats["task_loss"], "the logged task loss is still the training batch's"
    assert -1.0 <= stats["oracle_rank_correlation"] <= 1.0
    # the weights are computed from exactly the held-out losses the rule measured
    model, rule, batch = fresh(warm, oracle_rows=[0, 12])
    rule.oracle_batch = held_out(tokenizer, model)
    seen = {}
    real_losses, real_weights = rule._held_out_losses, mgs_module.importance_weights
    monkeypatch.setattr(rule, "_held_out_losses", lambda *a: seen.setdefault("held_out", real_losses(*a)))
    monkeypatch.setattr(mgs_module, "importance_weights",
                        lambda cfg, samples, losses, base, stats: seen.setdefault("weighed", (base, list(losses))) and
                        real_weights(cfg, samples, losses, base, stats))
    stats = rule.step(batch, step=2)
    base, losses = seen["held_out"]
    assert seen["weighed"] == (base, losses)
    assert stats["oracle_best_improvement"] == pytest.approx(base - min(losses))
    assert stats["oracle_task_loss"] == base


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
    ({"perturb_params": "everything"}, "trainer.perturb_params"),
    ({"guide_params": "some"}, "trainer.guide_params"),
    ({"scoring_batch_size": 8, "batch_size": 16}, "trainer.scoring_batch_size"),
    ({"diagnose_every": 0}, "trainer.diagnose_every"),
    ({"diagnose_examples": 0}, "trainer.diagnose_examples"),
    ({"target_ess": 1.5}, "target_ess"),
    ({"weighting": "softmax"}, "weighting"),
    ({"antithetic": True, "num_samples": 3}, "even"),
    ({"line_search_scales": [1.0], "density": "exact"}, "line_search_scales"),
    ({"oracle_rows": [5, 2]}, "trainer.oracle_rows"),
    ({"oracle_rows": [3]}, "trainer.oracle_rows"),
])
def test_bad_lever_values_are_one_line_user_errors(override, needle):
    cfg = OmegaConf.merge(OmegaConf.structured(MGSConfig), override)
    with pytest.raises(UserError, match=needle) as info:
        rule_class("mgs").check_config(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_loop_with_diagnostics_trains_the_same_weights_and_logs_them(tmp_path, capfd, data_dir):
    """Through the real loop: 3 MGS steps from a 4-step MLE warm start, diagnostics every step vs off."""
    from safetensors.torch import load_file

    common = ["trainer=mgs", *TINY_CLI, "trainer.warm_start_steps=4", "trainer.max_steps=3", "trainer.batch_size=8",
              "trainer.num_samples=2", "trainer.max_new_tokens=8", "trainer.log_every=1", "trainer.eval_every=100",
              "trainer.save_every=100", "data.max_train_examples=64", "data.max_eval_examples=8",
              "trainer.warm_start_eval_every=100", "decode.max_new_tokens=8"]
    runs = {}
    for name, extra in (("off", []), ("on", ["trainer.diagnose_every=1", "trainer.diagnose_examples=4"])):
        out = tmp_path / name
        code, _, err = run_main("mleps.train", *common, *extra, f"output_dir={out}", capfd=capfd)
        assert code == 0, err
        runs[name] = out
    a = load_file(runs["off"] / "checkpoints" / "last" / "model.safetensors")
    b = load_file(runs["on"] / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    main_steps = [e for e in read_jsonl(runs["on"] / "metrics.jsonl")
                  if e.get("split") == "train" and e.get("phase") == "main" and "event" not in e]
    assert len(main_steps) == 3 and all("diag_taken_loss" in e and "ess" in e for e in main_steps)
    code, _, err = run_main("mleps.train", *common, "trainer.diagnose_every=1", "data.validation_file=null",
                            f"output_dir={tmp_path / 'bad'}", capfd=capfd)
    assert_user_error(code, err, "trainer.diagnose_every")

    # trainer.oracle_rows through the loop: rows after the checkpoint-selecting subset, logged every step
    code, _, err = run_main("mleps.train", *common, "trainer.oracle_rows=[8,12]", f"output_dir={tmp_path / 'oracle'}",
                            capfd=capfd)
    assert code == 0, err
    steps = [e for e in read_jsonl(tmp_path / "oracle" / "metrics.jsonl")
             if e.get("split") == "train" and e.get("phase") == "main" and "event" not in e]
    assert len(steps) == 3 and all("oracle_task_loss" in e and e["oracle_s"] > 0 for e in steps)  # corr.: NaN on ties
    for i, (rows, needle) in enumerate((("[4,12]", "overlaps the 8 validation rows"), ("[8,100000]", "stop at"))):
        bad = tmp_path / f"bad-oracle-{i}"
        code, _, err = run_main("mleps.train", *common, f"trainer.oracle_rows={rows}", f"output_dir={bad}", capfd=capfd)
        assert_user_error(code, err, needle)
        assert not (bad / "metrics.jsonl").exists(), "refused before the run dir is prepared"

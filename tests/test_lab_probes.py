"""The lab's MGS probes (mleps_lab.probes): the held-out diagnostic leaves θ, the update and the training
trajectory untouched; the oracle weighs the samples by their held-out losses. Installed through the
rule's `probes` (unit tests) and through `python -m mleps_lab.train` (the loop callback)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CLI, assert_user_error, read_jsonl, run_main
from mleps.errors import UserError
from mleps_lab import probes as probes_module
from mleps_lab.probes import HeldOutDiagnostic, MGSProbeConfig, OracleWeights, check_probe_config
from test_mgs import params_of, tiny_model
from test_mgs_levers import fresh, grads, held_out, warm  # noqa: F401  (warm: the module fixture)

torch.set_num_threads(1)


def held_out_rows(tokenizer):
    """test_mgs_levers.held_out, collated for a model of the same (tiny) config."""
    return held_out(tokenizer, tiny_model())


def test_diagnostics_change_nothing_and_score_the_step_taken(warm, monkeypatch):
    tokenizer = warm[0]
    results = {}
    for diagnose in (None, 1):
        probes = [HeldOutDiagnostic(held_out_rows(tokenizer), diagnose)] if diagnose else []
        model, rule, batch = fresh(warm, probes=probes)
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
    model, rule, batch = fresh(warm, probes=[OracleWeights(warm[2])])
    rule.step(batch, step=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(model)))

    model, rule, batch = fresh(warm, probes=[OracleWeights(held_out_rows(tokenizer))])
    theta = params_of(model)
    stats = rule.step(batch, step=2)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta)), "θ restored bit for bit"
    assert not all(torch.allclose(a, b) for a, b in zip(plain, grads(model))), "other rows, other weights"
    assert stats["task_loss"] == plain_stats["task_loss"], "the logged task loss is still the training batch's"
    assert -1.0 <= stats["oracle_rank_correlation"] <= 1.0
    # the weights are computed from exactly the held-out losses the rule measured
    model, rule, batch = fresh(warm, probes=[OracleWeights(held_out_rows(tokenizer))])
    seen = {}
    real_losses, real_weights = probes_module.held_out_losses, mgs_module.importance_weights
    monkeypatch.setattr(probes_module, "held_out_losses", lambda *a: seen.setdefault("held_out", real_losses(*a)))
    monkeypatch.setattr(mgs_module, "importance_weights",
                        lambda cfg, samples, losses, base, stats: seen.setdefault("weighed", (base, list(losses))) and
                        real_weights(cfg, samples, losses, base, stats))
    stats = rule.step(batch, step=2)
    base, losses = seen["held_out"]
    assert seen["weighed"] == (base, losses)
    assert stats["oracle_best_improvement"] == pytest.approx(base - min(losses))
    assert stats["oracle_task_loss"] == base




@pytest.mark.parametrize("override,needle", [
    ({"diagnose_every": 0}, "trainer.diagnose_every"),
    ({"diagnose_examples": 0}, "trainer.diagnose_examples"),
    ({"oracle_rows": [5, 2]}, "trainer.oracle_rows"),
    ({"oracle_rows": [3]}, "trainer.oracle_rows"),
])
def test_bad_probe_values_are_one_line_user_errors(override, needle):
    cfg = OmegaConf.create({"trainer": OmegaConf.merge(OmegaConf.structured(MGSProbeConfig), override),
                            "data": {"validation_file": "valid.jsonl"}})
    with pytest.raises(UserError, match=needle) as info:
        check_probe_config(cfg)
    assert "\n" not in str(info.value)


def test_the_library_cli_refuses_the_probe_keys(capfd):
    """The probes are the lab's: `python -m mleps.train` has no such setting (Hydra names the key)."""
    code, _, err = run_main("mleps.train", "trainer=mgs", "trainer.diagnose_every=1", capfd=capfd)
    assert_user_error(code, err, "diagnose_every")


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
        code, _, err = run_main("mleps_lab.train", *common, *extra, f"output_dir={out}", capfd=capfd)
        assert code == 0, err
        runs[name] = out
    a = load_file(runs["off"] / "checkpoints" / "last" / "model.safetensors")
    b = load_file(runs["on"] / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    main_steps = [e for e in read_jsonl(runs["on"] / "metrics.jsonl")
                  if e.get("split") == "train" and e.get("phase") == "main" and "event" not in e]
    assert len(main_steps) == 3 and all("diag_taken_loss" in e and "ess" in e for e in main_steps)
    code, _, err = run_main("mleps_lab.train", *common, "trainer.diagnose_every=1", "data.validation_file=null",
                            f"output_dir={tmp_path / 'bad'}", capfd=capfd)
    assert_user_error(code, err, "trainer.diagnose_every")

    # trainer.oracle_rows through the loop: rows after the checkpoint-selecting subset, logged every step
    code, _, err = run_main("mleps_lab.train", *common, "trainer.oracle_rows=[8,12]", f"output_dir={tmp_path / 'oracle'}",
                            capfd=capfd)
    assert code == 0, err
    steps = [e for e in read_jsonl(tmp_path / "oracle" / "metrics.jsonl")
             if e.get("split") == "train" and e.get("phase") == "main" and "event" not in e]
    assert len(steps) == 3 and all("oracle_task_loss" in e and e["oracle_s"] > 0 for e in steps)  # corr.: NaN on ties
    for i, (rows, needle) in enumerate((("[4,12]", "overlaps the 8 validation rows"), ("[8,100000]", "stop at"))):
        bad = tmp_path / f"bad-oracle-{i}"
        code, _, err = run_main("mleps_lab.train", *common, f"trainer.oracle_rows={rows}", f"output_dir={bad}", capfd=capfd)
        assert_user_error(code, err, needle)
        assert not (bad / "metrics.jsonl").exists(), "refused before the run dir is prepared"

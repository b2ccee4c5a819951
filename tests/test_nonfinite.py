"""Non-finite loss or gradient: the step is skipped and counted; `trainer.max_bad_steps` in a row stop
the run with exit code BAD_STEPS_EXIT and a one-line message, and checkpoints/last stays the last good one.

NaN is injected by wrapping MLE.step (after its backward, the loss and every gradient become NaN),
in process for the loop's skip logic and in a real `python -m mleps.train`-equivalent subprocess
for the exit code and message.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mleps.trainers.mle as mle
from conftest import REPO, TINY_MODEL
from mleps.checkpoint import STATE_FILE, TrainState
from mleps.errors import BAD_STEPS_EXIT, TrainingDiverged
from mleps.loop import Loop
from mleps.trainers.base import Shard
from test_resume import small_data_dir

NAN_STEP = '''
def nan_step(self, batch, step, shard=Shard(), _orig=MLE.step):
    stats = _orig(self, batch, step, shard)
    if {condition}:
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        stats["loss"] = float("nan")
    return stats
MLE.step = nan_step
'''


def poison(monkeypatch, bad_steps):
    original = mle.MLE.step

    def nan_step(self, batch, step, shard=Shard()):
        stats = original(self, batch, step, shard)
        if step in bad_steps:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            stats["loss"] = float("nan")
        return stats

    monkeypatch.setattr(mle.MLE, "step", nan_step)


def causal_cfg(base_cfg):
    """base_cfg with tiny GPT-2 on a completion task (the English side of the pairs as documents)."""
    from conftest import compose_cfg

    cfg = compose_cfg("trainer=mle", "data=completion", "model=tiny_gpt2", *TINY_MODEL, "data.text_column=en",
                      "data.prefix_tokens=4", "data.continuation_tokens=12", "data.max_source_length=8")
    for key in ("trainer", "decode"):
        cfg[key] = base_cfg[key]
    cfg.progress, cfg.cpu, cfg.data.max_eval_examples = False, True, 32
    return cfg


def make_loop(cfg, run_dir) -> Loop:
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra creates it for the CLI
    data = small_data_dir(run_dir.parent / "data") / "multi30k"
    cfg.data.train_file, cfg.data.validation_file = str(data / "train.jsonl"), str(data / "validation.jsonl")
    cfg.data.max_train_examples = 128
    loop = Loop(cfg, run_dir)
    loop.setup()
    return loop


def test_bad_step_counting_unit():
    loop = Loop.__new__(Loop)
    loop.ckpt_dir = REPO / "does-not-exist"
    loop.state = TrainState()
    assert Loop._step_is_finite({"loss": 1.0, "ess": float("nan")}, 0.5), "diagnostics may be NaN"
    assert not Loop._step_is_finite({"loss": float("inf")}, 0.5)
    assert not Loop._step_is_finite({"loss": 1.0}, float("nan"))
    loop._count_bad_step(3, max_bad_steps=2)
    assert (loop.state.bad_steps_total, loop.state.bad_steps_in_a_row) == (1, 1)
    with pytest.raises(TrainingDiverged) as err:
        loop._count_bad_step(4, max_bad_steps=2)
    assert err.value.exit_code == BAD_STEPS_EXIT == 3
    assert "2 non-finite steps in a row" in str(err.value) and "no checkpoint was saved" in str(err.value)


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_alone(base_cfg, tmp_path, monkeypatch, family):
    if family == "causal":
        base_cfg = causal_cfg(base_cfg)
    base_cfg.trainer.max_steps = 4
    base_cfg.trainer.max_bad_steps = 3
    poison(monkeypatch, bad_steps={1, 2})
    loop = make_loop(base_cfg, tmp_path / "run")
    updates, snapshots = [], []  # steps whose update was applied; weights before each step
    real_run_phase = loop._run_phase

    def run_phase(phase, model, optimizer, scheduler, rule, stream, interrupt):
        real_apply = rule.apply

        def apply(opt):
            updates.append(loop.state.step)
            real_apply(opt)

        rule.apply = apply
        real_step = rule.step

        def step(batch, s, shard=Shard()):
            snapshots.append((s, [p.detach().clone() for p in model.parameters()]))
            return real_step(batch, s, shard)

        rule.step = step
        return real_run_phase(phase, model, optimizer, scheduler, rule, stream, interrupt)

    loop._run_phase = run_phase
    loop.train()
    assert type(loop.accelerator.unwrap_model(loop.model)).__name__ == \
        {"seq2seq": "MarianMTModel", "causal": "GPT2LMHeadModel"}[family]
    assert updates == [0, 3], "steps 1 and 2 applied no update"
    assert loop.state.bad_steps_total == 2 and loop.state.bad_steps_in_a_row == 0
    assert loop.state.step == 4, "a skipped step still counts: its batch is not retried"
    # the weights before step 2 (after skipped step 1) are those before step 1
    before = dict(snapshots)
    assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3]))
    assert all(bool(torch.isfinite(p).all()) for p in loop.model.parameters())
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in train if e["split"] == "train"] == [1, 2, 3, 4]


def test_non_finite_weights_never_replace_a_good_checkpoint(base_cfg, tmp_path):
    loop = make_loop(base_cfg, tmp_path / "run")
    loop._t_start = 0.0
    loop.save("last")
    good = load_file(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors")
    with torch.no_grad():
        next(loop.model.parameters()).fill_(float("inf"))
    loop.state.step = 1
    loop.save("last")
    kept = load_file(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)


@pytest.mark.slow
def test_too_many_bad_steps_exit_3_with_one_line_and_last_good_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    # `python -m mleps.train`, with MLE.step patched to return NaN from step 4 on
    script = ("import runpy\nfrom mleps.trainers.mle import MLE\nfrom mleps.trainers.base import Shard\n" + NAN_STEP.format(condition="step >= 4")
              + "runpy.run_module('mleps.train', run_name='__main__', alter_sys=True)\n")
    overrides = ["trainer=mle", "model.vocab_size=300", "model.d_model=32", "model.layers=1", "model.heads=2",
                 "model.ffn_dim=64", "progress=false", "cpu=true", "decode.max_new_tokens=8",
                 "data.max_train_examples=128", "data.max_eval_examples=16", "trainer.batch_size=16",
                 "trainer.max_steps=20", "trainer.save_every=2", "trainer.eval_every=100", "trainer.log_every=1",
                 "trainer.max_bad_steps=3", f"output_dir={run}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLEPS_DATA_DIR=str(small_data_dir(tmp_path / "data")))
    proc = subprocess.run([sys.executable, "-c", script, *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == BAD_STEPS_EXIT, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 non-finite steps in a row (up to step 7" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = run / "checkpoints" / "last"
    assert str(last) in errors[0]
    # saved at step 6 after two skipped steps: the weights of step 4, the count carried for a resume
    state = json.loads((last / STATE_FILE).read_text())
    assert (state["step"], state["bad_steps_in_a_row"], state["bad_steps_total"]) == (6, 2, 2)
    weights = load_file(last / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    skipped = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(e["split"] == "train" and math.isnan(e.get("loss", 0.0)) for e in skipped)

"""FSDP2 (mleps/conf/accelerate/fsdp.yaml) on two CPU processes trains exactly what one process trains.

accelerate builds its FSDP state only on an accelerator, so tests/fsdp_cpu_train.py switches its
CPU process group to FSDP; from there the run goes through accelerate's fully_shard wrapping and
mleps's sharded paths: gathered checkpoints (weights and optimizer state), resume into the shards,
synced decoding of the whole validation set on every process, and training decodes (pg, mrt).

Tolerance: bit for bit against 1 process with 2 accumulation steps, as for DDP (tests/test_distributed.py):
the two processes' gradients meet in a reduce-scatter as (g0 + g1) / 2 over 2 processes each scaled
by 2, equal in floating point to the accumulated g0 + g1.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose_cfg, read_jsonl
from mleps.loop import Loop
from test_distributed import free_port, overrides

pytestmark = pytest.mark.slow

CAUSAL = ["data=completion", "model=tiny_gpt2", "data.prefix_tokens=5", "data.continuation_tokens=8",
          "model.max_positions=64", "trainer.max_new_tokens=8"]


def fsdp_launch(*args: str, entry: tuple[str, ...] = (str(REPO / "tests" / "fsdp_cpu_train.py"),)):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "mleps" / "conf" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(free_port()), *entry, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def one_line_errors(proc) -> list[str]:
    assert proc.returncode != 0
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def saved_weights(run) -> dict:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def one_process(run, data_dir, trainer, *extra) -> dict:
    loop = Loop(compose_cfg(*overrides(data_dir, trainer, *extra, "trainer.gradient_accumulation_steps=2",
                                       f"output_dir={run}")), run)
    loop.setup()
    loop.train()
    return saved_weights(run)


def initial_weights(run, data_dir, trainer) -> dict:
    loop = Loop(compose_cfg(*overrides(data_dir, trainer, f"output_dir={run}")), run)
    loop.setup()
    return {k: v.detach().clone() for k, v in loop.model.state_dict().items()}


def validation_scores(run) -> list[float]:
    return [e["score"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "validation"]


def assert_same_run(ours, theirs):
    """The same tensors under the same names (one copy of a tied weight, as a one-process save writes),
    equal bit for bit; the same validation scores."""
    a, b = saved_weights(ours), saved_weights(theirs)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: max |diff| " \
                          f"{(a[different[0]] - b[different[0]]).abs().max():.3g}"
    assert len(validation_scores(ours)) >= 2 and validation_scores(ours) == pytest.approx(validation_scores(theirs),
                                                                                         abs=1e-9)


def test_fsdp_mle_with_lora_on_marian_equals_one_process_bit_for_bit(tmp_path, data_dir):
    """A LoRA adapter on the sharded model: the base and adapter files of the gathered save."""
    extra = ["model.peft=lora", "trainer.save_every=2"]
    proc = fsdp_launch(*overrides(data_dir, "mle", *extra), f"output_dir={tmp_path / 'fsdp'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_process(tmp_path / "one", data_dir, "mle", *extra)
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    ours, theirs = (load_file(str(run / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
                    for run in (tmp_path / "fsdp", tmp_path / "one"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k), "the adapter did not train"


def test_fsdp_pg_resumed_equals_one_process_bit_for_bit(tmp_path, data_dir):
    """The whole of Marian sharded: its three holders of the tied embedding in one unit, the first
    validation's generate before any training forward (the root gathered by hand), training decodes in
    step on both processes, the gathered save, and its optimizer state loaded into the shards on resume."""
    run = tmp_path / "fsdp"
    args = [*overrides(data_dir, "pg"), "trainer.save_every=1", f"output_dir={run}"]
    first = fsdp_launch(*args, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = fsdp_launch(*args, "trainer.max_steps=4", "resume=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "train"] == [1, 2, 3, 4]
    one_process(tmp_path / "one", data_dir, "pg", "trainer.max_steps=4", "trainer.save_every=1")
    assert_same_run(run, tmp_path / "one")
    initial, ours = initial_weights(tmp_path / "init", data_dir, "pg"), saved_weights(run)
    assert any(not torch.equal(ours[k], initial[k]) for k in ours), "training did not move the weights"


def test_fsdp_mrt_on_gpt2_equals_one_process_bit_for_bit(tmp_path, data_dir):
    proc = fsdp_launch(*overrides(data_dir, "mrt", *CAUSAL), "trainer.save_every=3", f"output_dir={tmp_path / 'fsdp'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_process(tmp_path / "one", data_dir, "mrt", *CAUSAL, "trainer.save_every=3")
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")


def test_fsdp_refuses_mgs_at_start_with_one_line(tmp_path, data_dir):
    run = tmp_path / "fsdp"
    proc = fsdp_launch(*overrides(data_dir, "mgs"), f"output_dir={run}")
    errors = one_line_errors(proc)
    assert errors and all("trainer=mgs reads and writes whole parameters" in e and "multi_gpu.yaml" in e
                          for e in errors), proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_the_fsdp_config_on_cpus_without_the_shim_is_refused_not_run_as_ddp(tmp_path, data_dir, capfd, monkeypatch):
    """accelerate would quietly train with DDP: the user asked for sharding, so say it cannot happen. One
    process with the environment `accelerate launch --config_file mleps/conf/accelerate/fsdp.yaml` sets."""
    from conftest import assert_user_error, run_main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    run = tmp_path / "fsdp"
    code, _, err = run_main("mleps.train", *overrides(data_dir, "mle"), f"output_dir={run}", capfd=capfd)
    assert_user_error(code, err, "asks for FSDP", "cpu_2proc.yaml")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()

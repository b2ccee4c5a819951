"""Several processes (accelerate launch, gloo on CPU) train exactly what one process trains.

One `accelerate launch --num_processes 2` runs every scenario (tests/distributed_worker.py);
the one-process references run here, in-process, from the same config.

Tolerances: 2 processes x batch 8 against 1 process x batch 8 x 2 accumulation steps must be
bit-identical. Both compute the same two micro-batches with the same shapes and seeds; the
gradients meet as g0 + g1 (accumulation) or as (2 g0 + 2 g1) / 2 (DDP, with each loss scaled
by the number of processes), which are equal in floating point for 2 processes; the metric
statistics MGS all-reduces are sums of two terms too. Against 1 process x batch 16 (no
accumulation) the token sums run in another order and the padding differs, so only closeness
is asserted (float32 rounding, a few steps: atol 1e-5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_MODEL, compose_cfg, read_jsonl
from mleps.loop import Loop

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # collective_timeout_s of every scenario; the hang scenario waits this long


def overrides(data_dir, trainer: str, *extra: str) -> list[str]:
    common = [f"trainer={trainer}", f"data_dir={data_dir}", *TINY_MODEL, "model.dropout=0.1",
              "data.max_train_examples=128", "data.max_eval_examples=5", "data.max_source_length=48",
              "data.max_target_length=48", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.eval_every=2",
              "trainer.log_every=1", "trainer.save_every=1000", "trainer.warmup_steps=0", "trainer.schedule=constant",
              "trainer.lr=1e-3", "decode.max_new_tokens=12", "decode.batch_size=2", "progress=false", "cpu=true",
              f"collective_timeout_s={TIMEOUT_S}", "overwrite=true"]
    per_trainer = {
        "mle": [],
        "pg": ["trainer.max_new_tokens=12", "trainer.max_steps=3"],
        "mrt": ["trainer.max_new_tokens=12", "trainer.max_steps=3"],
        "mgs": ["trainer.max_new_tokens=12", "trainer.max_steps=3", "trainer.warm_start_steps=2",
                "trainer.warm_start_eval_every=2", "trainer.lr=1e-2"],
    }
    return [*common, *per_trainer[trainer], *extra]


SCENARIOS = {  # name: (trainer, extra overrides, injection)
    "mle": ("mle", [], None),
    "pg": ("pg", [], None),
    "mrt": ("mrt", [], None),
    "mgs": ("mgs", [], None),
    "mgs_population": ("mgs", ["trainer.parallel=population"], None),
    # a new task loss: its statistics are all-reduced in the step and at validation, with secondary metrics
    "mgs_repetition": ("mgs", ["metric=repetition", "metric.n=2", "eval.metrics=[nontermination,length,bleu]"], None),
    "mgs_population_batched": ("mgs", ["trainer.parallel=population", "trainer.decode_population=batched"], None),
    # a decoder-only model (tiny GPT-2) on the completion task
    "mgs_causal": ("mgs", ["data=completion", "model=tiny_gpt2", "data.prefix_tokens=5", "data.continuation_tokens=8",
                           "metric=repetition"], None),
    "mle_no_dropout": ("mle", ["model.dropout=0.0"], None),
    "mgs_no_dropout": ("mgs", ["model.dropout=0.0"], None),
    "diverge": ("mle", [], "diverge"),
    "nan": ("mle", ["data.max_eval_examples=1"], "nan"),  # one validation sentence: rank 1's shard is empty
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("two_processes")
    specs = {name: {"overrides": overrides(data_dir, trainer, *extra, f"output_dir={out / name}"), "inject": inject}
             for name, (trainer, extra, inject) in SCENARIOS.items()}
    specs["hang"] = {"inject": "hang", "timeout_s": TIMEOUT_S}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(specs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(REPO / "tests" / "distributed_worker.py"),
                           str(out), str(spec_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def result(out, name: str, rank: int) -> dict:
    return json.loads((out / name / f"result-rank{rank}.json").read_text())


def params(out, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / f"params-rank{rank}.safetensors"))


def one_process(tmp_path, data_dir, name: str, *extra: str) -> tuple[dict[str, torch.Tensor], Loop]:
    trainer, scenario_extra, _ = SCENARIOS[name]
    cfg = compose_cfg(*overrides(data_dir, trainer, *scenario_extra, *extra, f"output_dir={tmp_path / name}"))
    loop = Loop(cfg, tmp_path / name)
    loop.setup()
    loop.train()
    return {k: v.detach().clone() for k, v in loop.model.named_parameters()}, loop


def assert_ok(out, name):
    for rank in (0, 1):
        r = result(out, name, rank)
        assert r["ok"], r


@pytest.mark.parametrize("name", ["mle", "pg", "mrt", "mgs", "mgs_population", "mgs_repetition",
                                  "mgs_population_batched", "mgs_causal"])
def test_two_processes_equal_one_process_with_accumulation_bit_for_bit(two_processes, tmp_path, data_dir, name):
    assert_ok(two_processes, name)
    rank0, rank1 = params(two_processes, name, 0), params(two_processes, name, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the two processes hold different parameters"
    reference, loop = one_process(tmp_path, data_dir, name, "trainer.gradient_accumulation_steps=2")
    initial = params_at_init(tmp_path, data_dir, name)
    assert any(not torch.equal(reference[k], initial[k]) for k in reference), "training did not move the weights"
    different = [k for k in reference if not torch.equal(reference[k], rank0[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: max |diff| " \
                          f"{(reference[different[0]] - rank0[different[0]]).abs().max():.3g}"
    # every evaluation (the sync check runs at each) decoded the validation set in two shards, and scored it as one
    ours = [e["score"] for e in read_jsonl(two_processes / name / "metrics.jsonl") if e["split"] == "validation"]
    theirs = [e["score"] for e in read_jsonl(tmp_path / name / "metrics.jsonl") if e["split"] == "validation"]
    assert len(ours) >= 2 and ours == pytest.approx(theirs, abs=1e-9)
    if name == "mgs_repetition":  # the secondary metrics and the references' cross-entropy too
        for key in ("loss", "nontermination", "length", "bleu", "cross_entropy"):
            ours = [e[key] for e in read_jsonl(two_processes / name / "metrics.jsonl") if e["split"] == "validation"]
            theirs = [e[key] for e in read_jsonl(tmp_path / name / "metrics.jsonl") if e["split"] == "validation"]
            # cross-entropy: float32 sums of two shards against one sum (~1e-8 apart); the rest is exact
            assert ours == pytest.approx(theirs, rel=1e-6 if key == "cross_entropy" else 1e-9, abs=1e-9), key


def params_at_init(tmp_path, data_dir, name):
    _, loop = one_process(tmp_path / "init", data_dir, name, "trainer.max_steps=0", "trainer.warm_start_steps=0")
    return {k: v.detach().clone() for k, v in loop.model.named_parameters()}


@pytest.mark.parametrize("name", ["mle_no_dropout", "mgs_no_dropout"])
def test_two_processes_of_8_match_one_process_of_16(two_processes, tmp_path, data_dir, name):
    assert_ok(two_processes, name)
    reference, _ = one_process(tmp_path, data_dir, name, "trainer.batch_size=16")
    ours = params(two_processes, name, 0)
    worst = max((reference[k] - ours[k]).abs().max().item() for k in reference)
    print(f"{name}: max |2 x 8 - 1 x 16| = {worst:.3g}")
    assert worst < 1e-5, f"max |diff| {worst:.3g}"


def test_a_divergence_between_processes_is_reported_at_the_next_evaluation(two_processes):
    for rank in (0, 1):
        r = result(two_processes, "diverge", rank)
        assert not r["ok"] and r["exit_code"] == 4, r
        assert "at step 2" in r["error"] and "rank 1 differs from rank 0" in r["error"], r["error"]


def test_a_non_finite_step_on_one_process_is_skipped_by_every_process(two_processes):
    assert_ok(two_processes, "nan")
    for rank in (0, 1):
        assert result(two_processes, "nan", rank)["state"]["bad_steps_total"] == 1
    rank0, rank1 = params(two_processes, "nan", 0), params(two_processes, "nan", 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    scores = [e for e in read_jsonl(two_processes / "nan" / "metrics.jsonl") if e["split"] == "validation"]
    assert scores and all(e["n"] == 1 for e in scores), "an empty validation shard on rank 1 neither hung nor lost the sentence"


def test_a_collective_one_process_never_joins_fails_after_the_timeout(two_processes):
    r = result(two_processes, "hang", 1)
    assert not r["ok"], r
    assert TIMEOUT_S - 1 <= r["waited_s"] < TIMEOUT_S + 9, r


def free_port() -> int:
    """A port nothing listens on now (a fixed one collides with other test runs on the machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "mleps" / "conf" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port),
                           "-m", "mleps.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_accelerate_launch_cli_resumes_two_processes_exactly(tmp_path, data_dir):
    """The shipped CPU config through the real CLI: 2 PG steps, stop, resume to 4. The sampling
    seeds are functions of (seed, step, micro-batch), so the resumed run equals one straight run."""
    run = tmp_path / "run"
    args = [*overrides(data_dir, "pg"), "trainer.eval_every=1000", f"output_dir={run}"]
    # cpu=true left out once: on a machine without GPUs the processes must still form one group
    # (they used to train as two independent runs, each logging every step into the same folder)
    first = launch(*[a for a in args if a != "cpu=true"], "trainer.max_steps=2", port=free_port())
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(*args, "trainer.max_steps=4", "resume=true", port=free_port())
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "train"]
    assert steps == [1, 2, 3, 4], "each step logged once, by the main process"
    resumed = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    reference, _ = one_process(tmp_path, data_dir, "pg", "trainer.max_steps=4", "trainer.gradient_accumulation_steps=2")
    assert all(torch.equal(resumed[k], reference[k]) for k in resumed if k in reference)
    assert len(set(resumed) & set(reference)) > 5


def test_several_processes_need_an_output_dir(monkeypatch, capfd, tmp_path):
    from conftest import assert_user_error, run_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    # Hydra creates its dated run dir (outputs/DATE/TIME) in the working directory before the
    # check runs: not in the repo, where two xdist workers in the same second would share it
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("mleps.train", "trainer=mle", capfd=capfd)
    assert_user_error(code, err, "output_dir=PATH")


def test_sigterm_stops_both_processes_at_one_step_with_a_checkpoint(tmp_path, data_dir):
    """torchrun forwards SIGTERM to every process, each at its own moment; they agree on the step to
    stop at (or one would wait forever in the other's next collective), save, and exit 130."""
    import signal
    import time

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "mleps" / "conf" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                             "-m", "mleps.train", *overrides(data_dir, "mle"), "trainer.max_steps=100000",
                             "trainer.eval_every=100000", f"output_dir={run}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "train"] \
                if (run / "metrics.jsonl").exists() else []
            if steps and steps[-1] >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    stops = [line for line in (run / "train.log").read_text().splitlines() if "continue with resume=true" in line]
    assert len(stops) == 2 and len({line.split(" at step ")[1] for line in stops}) == 1, stops
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "train"]
    assert state["step"] == steps[-1] >= 3, "the checkpoint is of the step both processes stopped at"

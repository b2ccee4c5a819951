"""The paper's completion experiment on a real pretrained model (scripts/reproduce.py completion_real):
the tiny budget end to end on a random tiny Llama (SmolLM2's module types, LoRA), and the cpu and gpu budgets'
commands without running them (its own file: pytest-xdist --dist loadfile runs it beside the other drivers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ARMS = {"mle", "pg", "grpo", "mrt", "mgs", "mgs_blind", "mgs_steer"}


@pytest.mark.slow
def test_tiny_completion_real_reproduction(tmp_path, data_dir):
    """Every arm from a LoRA base of the tiny Llama on AESLC paragraphs, scored by the base, paired tests with
    MGS-steer against MGS-blind and continued MLE, the report."""
    from safetensors.torch import load_file

    docs, runs = tmp_path / "docs", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "completion_real", "--budget",
                           "tiny", "--out", str(runs), "--results-md", str(docs / "c.md"), "--img-dir",
                           str(docs / "img"), "--json", str(docs / "c.json"), "--no-progress", "--preload"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((docs / "c.json").read_text())
    assert {r["arm"] for r in results["runs"]} == ARMS and results["seeds"] == [0]
    assert sorted(results["limits"], key=int) == ["8", "16"]
    base = results["base"]["checkpoint"]
    assert (runs / "base" / "checkpoints" / "best" / "adapter" / "adapter_config.json").is_file()  # a LoRA base
    config = (runs / "base" / ".hydra" / "config.yaml").read_text()
    assert "LlamaForCausalLM" in (runs / "tiny_llama" / "config.json").read_text() and "peft: lora" in config
    for r in results["runs"]:
        greedy = r["test"]["greedy"]
        assert 0 <= greedy["seq_rep"] <= 1 and 0 <= greedy["nontermination"] <= 1 and greedy["mean_tokens"] <= 16
        rows = [json.loads(line) for line in open(greedy["per_example"])]
        assert len(rows) == greedy["n"] and {"tokens", "ended", "lm", "seq_rep"} <= set(rows[0])
        log = runs / "logs" / f"{r['run_dir'].split('/runs/')[1].replace('/', '_')}-greedy.log"
        assert f"metric.score_model={base}" in log.read_text()
    # the MGS rules decode their population batched; every arm trains the base's adapter, and it moves
    for arm in ("mgs", "mgs_blind", "mgs_steer"):
        run = next(r["run_dir"] for r in results["runs"] if r["arm"] == arm)
        assert "decode_population: batched" in (open(f"{run}/.hydra/config.yaml").read())
    before = load_file(runs / "base" / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors")
    for arm in ARMS:
        run = next(r["run_dir"] for r in results["runs"] if r["arm"] == arm and r["budget"] == "equal_steps")
        after = load_file(f"{run}/checkpoints/last/adapter/adapter_model.safetensors")
        assert any(not (after[k] == before[k]).all() for k in before), arm
    paired = results["paired"]["equal_time"]["0"]
    assert {"mgs vs mle", "mgs vs mgs_blind", "mgs_steer vs mgs_blind", "mgs_steer vs mle", "grpo vs pg"} <= set(paired)
    md = (docs / "c.md").read_text()
    assert "# Results: completion_real (tiny budget)" in md and "MGS-steer (task-aware guide)" in md
    assert "## Degeneration of the base against the decode limit" in md and "### Paired tests, equal steps" in md
    assert any(v.startswith("At equal time: MGS-steer") and "MGS-blind on test task loss" in v
               for v in results["verdict"])
    assert len(results["examples"]) == 5


def test_the_tiny_llama_is_test_llamas_layout(tmp_path, data_dir):
    """The driver's tiny model (mleps_lab/tiny_llama.py) is tests/test_llama.py's tiny_llama, and written once."""
    from test_llama import tiny_llama

    from mleps_lab.tiny_llama import llama_config, write_tiny_llama

    ours, theirs = llama_config(300).to_dict(), tiny_llama(300).config.to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "eos_token_id")
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    folder = write_tiny_llama(tmp_path / "m", data_dir / "aeslc" / "train.jsonl")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_llama(tmp_path / "m", data_dir / "aeslc" / "train.jsonl") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and (folder / "tokenizer.json").is_file()


def test_cpu_and_gpu_budgets_commands_without_running_them(tmp_path):
    """What the documented budgets would run: SmolLM2 with LoRA, the summed LM loss, batched population decoding
    for the MGS rules only, and each budget's decode limit and seeds."""
    from mleps_lab.reproduce import Reproduction

    for budget, limit, seeds in (("cpu", 32, [0, 1]), ("gpu", 500, [0, 1, 2, 3, 4])):
        repro = Reproduction("completion_real", budget, tmp_path / budget)
        assert repro.task.arms == ["mle", "pg", "grpo", "mrt", "mgs", "mgs_blind", "mgs_steer"]
        assert repro.seeds == seeds and repro.calibration_rules() == ["mle", "pg", "grpo", "mrt", "mgs", "mgs_steer"]
        for arm in repro.task.arms:
            o = repro.rule_overrides(arm, 3, seed=0, lr=1e-4)
            assert {"model=smollm2", "model.peft=lora", "metric=lm", "metric.reduction=sum",
                    "data.sequences=paragraphs", f"decode.max_new_tokens={limit}"} <= set(o), arm
            assert ("trainer.decode_population=batched" in o) == arm.startswith("mgs"), arm
        assert repro.rule_overrides("mgs_blind", 3, 0)[:2] == ["trainer=mgs_paper", "trainer.weighting=uniform"]
        assert repro.rule_overrides("mgs_steer", 3, 0)[0] == "trainer=mgs_steer"
        assert f"decode.max_new_tokens={limit}" in repro.budget.evaluate


def test_the_gpu_budget_is_printed_and_refused_without_a_gpu(tmp_path):
    import torch

    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "completion_real", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    printed = run("--budget", "paper")
    assert printed.returncode == 0 and "completion_real --budget gpu" in printed.stdout
    assert "NOT run" in printed.stdout
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --budget gpu would run")
    refused = run("--budget", "gpu", "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error:")
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()

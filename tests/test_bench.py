"""scripts/bench_step.py runs end to end on a toy model and ends with its JSON summary line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

KEYS = ("mgs_inplace_over_irreducible", "mgs_copy_over_inplace", "mgs_over_pg", "mgs_peak_over_mle_peak")


@pytest.mark.slow
def test_bench_step_smoke(data_dir, tmp_path):
    env = dict(os.environ, MLEPS_DATA_DIR=str(data_dir), MLEPS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_step.py"), "--tiny-test", "--rounds", "1", "--cpu"],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = json.loads(lines[-1])
    for key in KEYS:
        assert key in summary and summary[key] > 0, (key, summary)
    assert set(summary["targets"]) == {"mgs_inplace_le_1.10x_irreducible", "mgs_inplace_faster_than_copy",
                                       "mgs_peak_le_mle_peak_plus_params", "mgs_le_1.3x_pg"}
    assert "mgs_inplace" in proc.stdout and "irreducible" in proc.stdout  # the table


def bench_summary(data_dir, tmp_path, *args, timeout: int) -> tuple[dict, str]:
    """scripts/bench_step.py --tiny-test ARGS, one round on the CPU: (its last line's JSON, its stdout)."""
    env = dict(os.environ, MLEPS_DATA_DIR=str(data_dir), MLEPS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_step.py"), "--tiny-test", *args,
                           "--rounds", "1", "--cpu"], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1]), proc.stdout


@pytest.mark.slow
def test_bench_step_population_smoke(data_dir, tmp_path):
    summary, out = bench_summary(data_dir, tmp_path, "--population", "--population-k", "2", timeout=180)
    for key in ("k2_decode_batched_over_sequential", "k2_step_batched_over_sequential"):
        assert 0 < summary[key] < 100, (key, summary)
    assert "population decoding" in out


@pytest.mark.slow
def test_bench_step_peft_smoke(data_dir, tmp_path):
    summary, out = bench_summary(data_dir, tmp_path, "--peft", "--lora-r", "2", "--num-samples", "2", timeout=600)
    assert 0 < summary["lora_over_full_state_bytes"] < 1, summary  # the adapter is a small part of the model
    assert summary["lora_over_full_step_s"] > 0
    # decoded tokens were counted, and the per-token ratio is the time ratio over the token ratio (up to the
    # medians' difference from the sums: loose)
    assert summary["lora_over_full_decoded_tokens"] > 0
    assert summary["lora_over_full_ms_per_token"] == pytest.approx(
        summary["lora_over_full_step_s"] / summary["lora_over_full_decoded_tokens"], rel=0.5)
    assert "whole model vs LoRA" in out and "ms/token" in out

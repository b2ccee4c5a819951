"""scripts/screen_mgs.py and scripts/mgs_report.py end to end on the tiny model (a few steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CLI, compose_cfg, run_cli
from mleps.loop import make_phases
from mleps.validate import validate_train_config

sys.path.insert(0, str(REPO / "scripts"))
from screen_mgs import LEVERS  # noqa: E402


RUN = [*TINY_CLI, "data.max_train_examples=64", "trainer.batch_size=8", "decode.max_new_tokens=8"]


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_every_screen_lever_is_a_valid_config(lever):
    """The overrides compose against the schema and pass every start-up check (the screen would
    otherwise fail only when it reaches that lever)."""
    cfg = compose_cfg("trainer=mgs", "data_dir=/d", "trainer.warm_start_steps=0", "trainer.diagnose_every=5",
                      *LEVERS[lever], lab=True)
    validate_train_config(cfg, make_phases(cfg.trainer))


@pytest.mark.slow  # four real training runs as subprocesses
def test_screen_runs_each_lever_and_tables_the_diagnostics(tmp_path, data_dir):
    rc, _, err = run_cli("mleps.train", "trainer=mle", *RUN, "trainer.max_steps=3", "data.max_eval_examples=8",
                         f"output_dir={tmp_path / 'base'}", cwd=tmp_path)
    assert rc == 0, err[-2000:]
    init = tmp_path / "base" / "checkpoints" / "last"
    out = tmp_path / "screen"
    env = dict(os.environ, MLEPS_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/screen_mgs.py", "--init", str(init), "--steps", "2",
                           "--out", str(out), "--levers", "rank", "--eval-examples", "8", "--diagnose-every", "1",
                           "--diagnose-examples", "4", "--", *RUN, "trainer.num_samples=2", "trainer.max_new_tokens=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "screen.json").read_text())
    rows = {r["lever"]: r for r in result["rows"]}
    assert list(rows) == ["default", "blind", "rank"]
    for row in rows.values():
        assert row["steps"] == 2 and row["final"] is not None and 0 < row["ess_share"] <= 1 + 1e-9
        assert -1 <= (row["rank_corr"] if row["rank_corr"] is not None else 0) <= 1
        assert row["taken_minus_blind"] is not None and row["s_per_step"] > 0
    assert rows["blind"]["final_vs_blind"] == 0.0
    assert rows["blind"]["ess_share"] == pytest.approx(1.0, abs=1e-6)  # α = 1e9: uniform weights
    assert "| rank |" in (out / "screen.md").read_text() and "| rank |" in proc.stdout

    report = subprocess.run([sys.executable, "scripts/mgs_report.py", str(out / "rank-seed0")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "ess_share" in report.stdout and "rank_corr" in report.stdout
    assert len(report.stdout.splitlines()) < 40

"""The reproduction driver end to end on the tiny budget, one task per file: pytest-xdist
(--dist loadfile) runs each file in one worker, so the slow tasks run side by side."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_tiny_scratch_curves(tmp_path, data_dir):
    """From random weights: MLE, PG and MGS at equal time, validation curves, no test stage."""
    docs = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "scratch", "--budget", "tiny",
                           "--out", str(tmp_path / "runs"), "--results-md", str(docs / "scratch.md"),
                           "--img-dir", str(docs / "img"), "--json", str(docs / "scratch.json"), "--no-progress", "--preload"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((docs / "scratch.json").read_text())
    assert sorted(r["arm"] for r in results["runs"]) == ["mgs", "mgs_blind", "mle", "pg"]
    assert all(r["curve"][0][0] == 0 and len(r["curve"]) >= 2 for r in results["runs"])
    assert not (tmp_path / "runs" / "test").exists() and "init_from" not in json.dumps(results["commands"])
    assert (docs / "img" / "scratch-equal_time.png").stat().st_size > 10_000
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    md = (docs / "scratch.md").read_text()
    assert set(timings) == {"calibration", "arms"} and "## Wall time" in md
    assert "MLE from scratch" in md and "continued" not in md  # nothing to continue from random weights

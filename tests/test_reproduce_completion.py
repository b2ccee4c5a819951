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
def test_tiny_completion_reproduction(tmp_path, data_dir):
    """tiny GPT-2 on email bodies: base chosen by cross-entropy, every arm on the composite loss, the
    completion columns, the bar as a computed verdict and the continuations side by side."""
    docs = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "completion", "--budget", "tiny",
                           "--seeds", "0", "--out", str(tmp_path / "runs"), "--results-md", str(docs / "c.md"),
                           "--img-dir", str(docs / "img"), "--json", str(docs / "c.json"), "--no-progress", "--preload"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((docs / "c.json").read_text())
    assert sorted(r["arm"] for r in results["runs"]) == ["mgs", "mgs_blind", "mle", "mrt", "pg"]
    assert results["base"]["selected_by"] == "cross_entropy"
    for r in results["runs"]:
        greedy = r["test"]["greedy"]
        assert 0 <= greedy["repetition"] <= 1 and 0 <= greedy["nontermination"] <= 1 and greedy["perplexity"] > 1
        # the arms keep the checkpoint with the lowest validation task loss
        assert r["val_best"] == min(c[2] for c in r["curve"])
    md = (docs / "c.md").read_text()
    assert "seq-rep-4" in md and "non-term." in md and "## Continuations side by side" in md
    assert "halved" in md and "+10 %" in md and "Paired bootstrap" not in md
    assert len(results["examples"]) == 5 and all(e["prefix"] and e["reference"] for e in results["examples"])

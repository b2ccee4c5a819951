"""The paper's completion setting through the reproduction driver, tiny budget (its own file: pytest-xdist
--dist loadfile runs it beside the other slow drivers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_tiny_completion_paper_reproduction(tmp_path, data_dir):
    """Whole emails with token-budget batches, the base against the decode limit, every arm on the summed LM
    loss scored by the base, per-sequence paired tests and the paper's bar as a computed verdict."""
    docs = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "completion_paper", "--budget",
                           "tiny", "--seeds", "0", "--out", str(tmp_path / "runs"), "--results-md", str(docs / "c.md"),
                           "--img-dir", str(docs / "img"), "--json", str(docs / "c.json"), "--no-progress"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((docs / "c.json").read_text())
    arms = {"mgs", "mgs_blind", "mgs_default", "mle", "mrt", "pg"}
    assert {r["arm"] for r in results["runs"]} == arms
    assert sorted(results["limits"], key=int) == ["8", "16", "24"]
    assert [results["limits"][k]["mean_tokens"] <= int(k) for k in results["limits"]] == [True] * 3
    base = results["base"]["checkpoint"]
    for r in results["runs"]:
        greedy = r["test"]["greedy"]
        assert 0 <= greedy["seq_rep"] <= 1 and 0 <= greedy["nontermination"] <= 1 and greedy["mean_tokens"] <= 24
        rows = [json.loads(line) for line in open(greedy["per_example"])]
        assert len(rows) == greedy["n"] and {"tokens", "ended", "lm", "seq_rep"} <= set(rows[0])
        # the task loss is the mean summed NLL under the base, whatever checkpoint decoded
        assert greedy["score"] == pytest.approx(sum(x["lm"] for x in rows) / len(rows), rel=1e-6)
        log = tmp_path / "runs" / "logs" / f"{r['run_dir'].split('/runs/')[1].replace('/', '_')}-greedy.log"
        assert f"metric.score_model={base}" in log.read_text()
    paired = results["paired"]["equal_time"]["0"]
    assert {"mgs vs mle", "mgs vs mgs_blind", "mgs_default vs mgs_blind"} <= set(paired)
    assert set(paired["mgs vs mle"]) == {"task_loss", "seq_rep", "nontermination"}
    md = (docs / "c.md").read_text()
    assert "## Degeneration of the base against the decode limit" in md and "### Paired tests, equal time" in md
    assert "MGS-LM (paper's proposal)" in md and "2× reduction" in md and "+10 %" in md
    assert len(results["examples"]) == 5

"""scripts/weight_signal.py: the rank agreement of oracle runs, pooled over runs, from metrics.jsonl."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_run(folder: Path, correlations, gains) -> Path:
    folder.mkdir()
    events = [{"step": 0, "split": "validation", "phase": "main", "score": 25.0}]
    events += [{"step": i + 1, "split": "train", "phase": "main", "oracle_rank_correlation": c,
                "oracle_best_improvement": g, "oracle_task_loss": 0.75, "ess_share": 0.5}
               for i, (c, g) in enumerate(zip(correlations, gains))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def run(*args):
    return subprocess.run([sys.executable, "scripts/weight_signal.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_rank_agreement_is_averaged_over_defined_steps_and_pooled(tmp_path):
    a = write_run(tmp_path / "a", [0.8, -0.4, float("nan")], [0.002, 0.004, 0.0])
    b = write_run(tmp_path / "b", [1.0, 0.2], [0.001, 0.001])
    out = tmp_path / "signal.json"
    proc = run(a, b, "--json", out)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in json.loads(out.read_text())}
    assert rows[str(a)]["steps"] == 2 and rows[str(a)]["rank_corr_mean"] == pytest.approx(0.2)
    pooled = rows["all"]
    assert pooled["steps"] == 4 and pooled["rank_corr_mean"] == pytest.approx(0.4)
    assert pooled["share_above_0"] == pytest.approx(0.75) and pooled["share_at_0.7"] == pytest.approx(0.5)
    assert pooled["heldout_best_gain"] == pytest.approx(0.008 / 5)


def test_a_run_without_oracle_statistics_is_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "phase": "main"}) + "\n")
    proc = run(plain)
    assert proc.returncode != 0 and "trainer.oracle_rows" in proc.stderr and "Traceback" not in proc.stderr

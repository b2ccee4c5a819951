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
                           "--img-dir", str(docs / "img"), "--json", str(docs / "c.json"), "--no-progress", "--preload"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((docs / "c.json").read_text())
    arms = {"mgs", "mgs_blind", "mgs_default", "mle", "mrt", "pg", "grpo"}
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
    assert {"mgs vs mle", "mgs vs mgs_blind", "mgs_default vs mgs_blind", "grpo vs pg", "grpo vs mle"} <= set(paired)
    assert "pg vs grpo" not in paired and "mle vs pg" not in paired  # each pair once
    assert set(paired["mgs vs mle"]) == {"task_loss", "seq_rep", "nontermination"}
    md = (docs / "c.md").read_text()
    assert "## Degeneration of the base against the decode limit" in md and "### Paired tests, equal time" in md
    assert "MGS-LM (paper's proposal)" in md and "2× reduction" in md and "+10 %" in md
    assert any(v.startswith("At equal time: GRPO-LM") and "PG-LM on test task loss" in v for v in results["verdict"])
    assert len(results["examples"]) == 5


def test_paired_bootstrap_over_sequences_on_known_differences():
    from mleps_lab.reproduce_report import paired_bootstrap_rows

    a = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6, 0.8] * 8
    same = paired_bootstrap_rows(a, list(a))
    assert same == {"delta": 0.0, "p": 1.0, "ci95": [0.0, 0.0]}
    shifted = paired_bootstrap_rows([x + 0.05 for x in a], a)  # every sequence 0.05 worse: no resample disagrees
    assert shifted["delta"] == pytest.approx(0.05) and shifted["p"] < 0.01
    assert shifted["ci95"][0] == pytest.approx(0.05) and shifted["ci95"][1] == pytest.approx(0.05)
    noisy = paired_bootstrap_rows([x + (0.01 if i % 2 else -0.01) for i, x in enumerate(a)], a)
    assert abs(noisy["delta"]) < 1e-12 and noisy["p"] > 0.5  # no difference on average
    # None (an output shorter than n for seq-rep) is left out of its own system's mean only
    assert paired_bootstrap_rows([None, 1.0, 3.0], [1.0, 1.0, 1.0])["delta"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same test rows"):
        paired_bootstrap_rows([1.0], [1.0, 2.0])


def test_an_arm_subset_with_a_borrowed_calibration(tmp_path):
    """--arms and --calibration-from: the long budget's runs, without running any."""
    from mleps.errors import UserError
    from mleps_lab.reproduce import Reproduction

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    repro = Reproduction("completion_paper", "long", tmp_path / "long", base=base, only_arms=["mgs_blind", "mgs", "mle"],
                         calibration_from=tmp_path / "cpu")
    assert repro.task.arms == ["mle", "mgs", "mgs_blind"]  # the task's order
    assert (repro.budget.train_s, repro.budget.seeds) == (480, (0,))
    calibration = tmp_path.resolve() / "cpu" / "calibration"
    assert repro.calibration_dirs() == {rule: [calibration / f"{rule}-r{r}" for r in (0, 1)] for rule in ("mle", "mgs")}
    for arms in (["mle", "pg"], ["mgs", "nope"]):
        with pytest.raises(UserError, match="--arms"):
            Reproduction("completion_paper", "long", tmp_path / "x", base=base, only_arms=arms)
    with pytest.raises(UserError, match="unknown budget 'long' for mt"):
        Reproduction("mt", "long", tmp_path / "y")


def test_an_extra_grpo_arm_is_compared_with_grpo_and_pg_in_the_verdict():
    """--arm grpo_nokl='trainer=grpo trainer.kl_coef=0': the verdict says what taking the KL out changed."""
    from mleps_lab.reproduce_report import completion_paper_verdict

    def pair(delta, p):
        return {key: {"delta": delta, "p": p, "ci95": [delta, delta]} for key in ("task_loss", "seq_rep",
                                                                                  "nontermination")}

    seeds = {str(s): {"grpo_nokl vs grpo": pair(-5.0, 0.01), "grpo_nokl vs pg": pair(2.0, 0.5),
                      "grpo vs pg": pair(3.0, 0.4)} for s in (0, 1)}
    results = {"base": {"test": {"greedy": {"nontermination": 0.3, "seq_rep": 0.7, "perplexity": 70.0}}},
               "summary": {}, "paired": {"equal_time": seeds}}
    verdict = completion_paper_verdict(results)
    against_grpo = [v for v in verdict if v.startswith("At equal time: grpo_nokl") and "GRPO-LM" in v]
    against_pg = [v for v in verdict if v.startswith("At equal time: grpo_nokl") and "PG-LM" in v]
    assert len(against_grpo) == 3 and len(against_pg) == 3
    assert "beats GRPO-LM on test task loss" in against_grpo[0] and "all 2 seeds" in against_grpo[0]
    assert "not distinguishable from PG-LM" in against_pg[0]

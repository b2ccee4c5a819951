"""The steering benchmark (mleps_lab/steer.py): its comparisons on known numbers, and the driver end to end
at the tests' size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mleps_lab.steer import BUDGETS, arm_overrides
from mleps_lab.steer_report import at_time, markdown, summarise


def result(arm, seed, losses, seconds, test_rows):
    curve = [{"step": 4 * i, "train_s": s, "loss": l, "bleu": 10.0} for i, (l, s) in enumerate(zip(losses, seconds))]
    rows = np.array(test_rows, dtype=float)
    return {"control": "length", "arm": arm, "seed": seed, "curve": curve, "train_s": seconds[-1], "diagnostics": {},
            "test_loss": float(rows[:, 0].sum() / rows[:, 1].sum()), "test_rows": rows.tolist(),
            "test_loss_corpus": 0.0, "test_bleu": 10.0, "test_bleu_no_bp": 12.0}


def test_equal_time_takes_the_last_evaluation_within_the_given_seconds():
    curve = [{"train_s": 0.0, "loss": 0.6}, {"train_s": 10.0, "loss": 0.4}, {"train_s": 20.0, "loss": 0.1}]
    assert at_time(curve, 15.0)["loss"] == 0.4
    assert at_time(curve, 20.0)["loss"] == 0.1
    assert at_time(curve, 5.0)["loss"] == 0.6


def test_steering_ratio_and_paired_comparison():
    n = 50
    good = [[0.1, 1.0]] * n  # sentence-level statistics: [loss, count] per test row
    bad = [[0.5, 1.0]] * n
    results = [result("mgs_blind", 0, [0.6, 0.6, 0.6], [0, 10, 20], bad),
               result("pg", 0, [0.6, 0.3, 0.0], [0, 5, 10], good),  # equal time is PG's 10 s
               result("mgs_steer", 0, [0.6, 0.3, 0.2], [0, 10, 20], good),
               result("mgs_steer_blind", 0, [0.6, 0.5, 0.45], [0, 10, 20], bad),
               result("mle", 0, [0.6, 0.55, 0.5], [0, 1, 2], bad)]  # done sooner: read at its end
    arms = summarise(results)["length"]["arms"]
    assert arms["pg"]["steering_ratio"] == pytest.approx(1.0)  # the best arm at equal time
    assert arms["mgs_steer"]["steering_ratio"] == pytest.approx((0.6 - 0.3) / 0.6)
    assert arms["mgs_blind"]["steering_ratio"] == pytest.approx(0.0)
    assert arms["mle"]["val_equal_time"] == [0.5]
    versus = arms["mgs_steer"]["vs"]["mgs_steer_blind"]
    assert versus["test_delta"] == [pytest.approx(-0.4)] and versus["p"][0] < 0.01
    assert arms["mgs_steer"]["vs"]["pg"]["p"][0] > 0.5  # equal test rows: not ahead
    assert "MGS-steer" in markdown(summarise(results), "cmd", BUDGETS["tiny"])


def test_rules_get_only_the_options_they_have():
    assert not any(o.startswith("trainer.max_new_tokens") for o in arm_overrides("mle", BUDGETS["tiny"]))
    assert not any(o.startswith("trainer.guide_samples") for o in arm_overrides("pg", BUDGETS["tiny"]))
    assert any(o.startswith("trainer.guide_samples") for o in arm_overrides("mgs_steer", BUDGETS["tiny"]))


@pytest.mark.slow
def test_the_driver_runs_arms_resumes_and_reports(trained_run, data_dir, tmp_path, monkeypatch):
    from mleps_lab.steer import main

    assert trained_run.rc == 0, trained_run.stderr
    monkeypatch.setenv("MLEPS_DATA_DIR", str(data_dir))
    argv = ["--base", str(trained_run.dir / "checkpoints" / "best"), "--out", str(tmp_path / "runs"),
            "--budget", "tiny", "--controls", "corpus_length", "--arms", "mgs_blind", "mgs_steer",
            "--report", str(tmp_path / "steer")]
    main(argv)
    done = sorted((tmp_path / "runs").glob("*/*/seed0/result.json"))
    assert [p.parts[-3] for p in done] == ["mgs_blind", "mgs_steer"]
    steer = json.loads(done[1].read_text())
    assert steer["diagnostics"]["guide_rows_swapped"] >= 0 and len(steer["test_rows"]) == 8
    assert [c["step"] for c in steer["curve"]] == [0, 1, 2]
    report = (tmp_path / "steer.md").read_text()
    assert "MGS-steer" in report and (tmp_path / "img" / "steer-corpus_length.png").exists()
    stamp = done[0].stat().st_mtime_ns
    main(argv)  # every arm has its result: nothing runs again
    assert done[0].stat().st_mtime_ns == stamp

"""The reproduction driver: aggregation on hand-made numbers, and the whole pipeline on the tiny budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mleps.errors import UserError
from mleps_lab.reproduce import Reproduction
from mleps_lab.reproduce_report import compare_sentence, markdown_table, mean_std, paired_bootstrap, summarize
from tests.conftest import REPO, assert_user_error

REFS = [["a man rides a red bike down the street"], ["two dogs play in the snow"],
        ["a woman is reading a book in the park"], ["children are swimming in a blue pool"]] * 10


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([30.0, 32.0, 34.0]) == (32.0, 2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_summarize_means_stds_and_deltas_against_the_base():
    def row(arm, seed, val, test):
        return {"budget": "equal_time", "arm": arm, "seed": seed, "steps": 10, "s_per_step": 1.0, "train_s": 10.0,
                "val_best": val, "test": {"greedy": {"score": test, "chrf": test + 20}}, "diagnostics": {}}
    rows = [row("mle", 0, 30, 31), row("mle", 1, 32, 33), row("mgs", 0, 29, 30), row("mgs", 1, 29, 30)]
    base = {"test": {"greedy": {"score": 30.0, "chrf": 50.0}}}
    s = summarize(rows, base, ["greedy"])["equal_time"]
    assert s["mle"]["test_greedy"] == pytest.approx([32.0, 2 ** 0.5])
    assert s["mle"]["test_greedy_delta"] == pytest.approx(2.0)
    assert s["mgs"]["chrf_greedy"] == pytest.approx([50.0, 0.0])
    assert s["mgs"]["chrf_greedy_delta"] == pytest.approx(0.0)
    assert s["mgs"]["val_best"] == pytest.approx([29.0, 0.0])


def test_paired_bootstrap_separates_a_better_system_and_not_an_identical_one():
    good = [r[0] for r in REFS]
    bad = ["a man rides a bike", "dogs in snow", "a woman reads", "children swim"] * 10
    out = paired_bootstrap(("bad", bad), [("good", good), ("same", bad)], REFS)
    assert out["good"]["bleu"]["delta"] > 30 and out["good"]["bleu"]["p"] < 0.01
    assert out["good"]["chrf"]["delta"] > 0 and out["good"]["chrf"]["p"] < 0.01
    assert out["same"]["bleu"]["delta"] == 0 and out["same"]["bleu"]["p"] == 1.0
    # sacrebleu's fixed seed: the same call gives the same p-values
    again = paired_bootstrap(("bad", bad), [("good", good[:20] + bad[20:])], REFS)
    assert again["good"]["bleu"]["p"] == paired_bootstrap(("bad", bad), [("good", good[:20] + bad[20:])],
                                                          REFS)["good"]["bleu"]["p"]


def test_verdict_sentence_follows_the_numbers():
    assert "MGS beats MLE" in compare_sentence("MGS", "MLE", [1.0, 0.5], [0.01, 0.02], "BLEU")
    assert "is beaten by" in compare_sentence("MGS", "MLE", [-1.0, -0.5], [0.01, 0.02], "BLEU")
    assert "significantly in 1 of 2" in compare_sentence("MGS", "MLE", [1.0, 0.5], [0.01, 0.3], "BLEU")
    assert "not distinguishable" in compare_sentence("MGS", "MLE", [1.0, -0.5], [0.2, 0.3], "BLEU")


def test_markdown_table_aligns_numbers_right():
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "| --- | ---: |", "| 1 | 2 |"]


def test_bad_arguments_stop_before_any_run(tmp_path, capsys):
    from scripts.reproduce import main

    with pytest.raises(SystemExit) as e:
        main(["mt", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert_user_error(e.value.code, capsys.readouterr().err, "--base", "checkpoint")
    with pytest.raises(SystemExit) as e:
        main(["mt", "--seeds", "0", "0", "--out", str(tmp_path / "out")])
    assert_user_error(e.value.code, capsys.readouterr().err, "--seeds")
    assert not (tmp_path / "out").exists()


def test_step_counts_come_from_the_calibration(tmp_path):
    """steps_r = round(T / s_r), from the mean step_s of the calibration runs (their first step left out)."""
    repro = Reproduction("mt", "tiny", tmp_path)
    for rule, dirs in repro.calibration_dirs().items():
        seconds = {"mle": 0.1, "pg": 0.5, "grpo": 0.6, "mrt": 0.4, "mgs": 0.3}[rule]
        for d in dirs:
            d.mkdir(parents=True)
            events = [{"step": 1, "split": "train", "step_s": 9.0}] + \
                     [{"step": s, "split": "train", "step_s": seconds} for s in (2, 3)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert repro.steps_for_time() == {"mle": 10, "pg": 2, "grpo": 2, "mrt": 2, "mgs": 3, "mgs_blind": 3}
    assert repro.arm_steps()["equal_steps"] == {a: 3 for a in ("mle", "pg", "grpo", "mrt", "mgs", "mgs_blind")}



def test_an_arm_subset_without_mle_searches_no_lr_and_plans_its_runs(tmp_path):
    """--arms mgs pg grpo: no lr_search jobs, no chosen lr, and the arms stage plans its runs (a bug: the
    arms stage read the lr search's validation scores, which this subset never makes)."""
    repro = Reproduction("mt", "tiny", tmp_path, only_arms=["mgs", "pg", "grpo"])
    for rule, dirs in repro.calibration_dirs().items():
        for d in dirs:
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "step_s": 0.25}) + "\n"
                                                     for s in (1, 2, 3)))
    assert sorted(repro.calibration_dirs()) == ["grpo", "mgs", "pg"]
    assert repro.stage_lr_search() == [] and repro.best_lr() is None
    assert {(b, a) for b, a, _ in repro.arm_runs()} == {(b, a) for b in ("equal_time", "equal_steps")
                                                        for a in ("pg", "grpo", "mgs")}
    assert len(repro.stage_arms()) == 3 * len(repro.seeds)  # equal steps = equal time here: one run each

def _reproduce(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    docs = tmp_path / "docs"
    # one seed: the aggregation over seeds is tested on hand-made numbers above; this is the pipeline.
    # --preload: every run forked from one process that imported torch once (test_both_launchers_run_a_job_
    # as_python_m_would covers the fresh-interpreter launcher the documented runs use)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "mt", "--budget", "tiny",
                           "--seeds", "0", "--out", str(tmp_path / "runs"), "--results-md", str(docs / "results.md"),
                           "--img-dir", str(docs / "img"), "--json", str(docs / "results" / "mt.json"), "--preload", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_reproduction_end_to_end_and_resume(tmp_path, data_dir):
    proc = _reproduce(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    docs = tmp_path / "docs"
    results = json.loads((docs / "results" / "mt.json").read_text())
    md = (docs / "results.md").read_text()
    # every arm x seed x budget ran, was tested greedy and beam 4, and reached the table
    assert {(r["budget"], r["arm"], r["seed"]) for r in results["runs"]} == {
        (b, a, s) for b in ("equal_time", "equal_steps") for a in ("mle", "pg", "grpo", "mrt", "mgs", "mgs_blind")
        for s in (0,)}
    for r in results["runs"]:
        assert set(r["test"]) == {"greedy", "beam4"} and r["test"]["greedy"]["n"] == 32
        assert r["curve"] and r["curve"][0][0] == 0
    steps = results["calibration"]["arm_steps"]
    assert all(r["steps"] == steps[r["budget"]][r["arm"]] for r in results["runs"])
    assert results["lr_search"]["chosen"] in (1e-4, 1e-3)
    assert "tok:13a" in md and "nc:6" in md and "MGS-blind" in md and "## Verdict" in md
    assert "mgs vs mle" in json.dumps(results["significance"])
    assert (docs / "results" / "mt.csv").read_text().count("\n") == len(results["runs"]) + 1
    for b in ("equal_time", "equal_steps"):
        assert (docs / "img" / f"mt-{b}.png").stat().st_size > 10_000
    # a second call finds everything done: no run starts again, the same numbers come out
    # the wall time of every stage is kept and reported
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert set(timings) == {"base", "calibration", "lr_search", "arms", "test"} and min(timings.values()) > 0
    assert results["stage_s"] == timings and "## Wall time" in md
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "logs").iterdir()}
    again = _reproduce(tmp_path, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs" / "logs").iterdir()} == logs
    assert json.loads((tmp_path / "runs" / "timings.json").read_text()) == timings  # nothing ran, nothing added
    assert json.loads((docs / "results" / "mt.json").read_text())["runs"] == results["runs"]


def test_an_extra_arm_is_calibrated_run_and_compared_like_the_others(tmp_path):
    repro = Reproduction("mt", "tiny", tmp_path, extra_arms={"mgs_hot": ["trainer=mgs", "trainer.temperature=0.5"]})
    assert "mgs_hot" in repro.calibration_rules() and repro.task.arms[-1] == "mgs_hot"
    assert "mgs_hot" not in Reproduction("mt", "tiny", tmp_path / "other").task.arms  # TASKS is not modified
    overrides = repro.rule_overrides("mgs_hot", 5, seed=1)
    assert overrides[:2] == ["trainer=mgs", "trainer.temperature=0.5"] and "trainer.max_steps=5" in overrides
    for bad, word in (({"mgs": ["trainer=mgs"]}, "fresh name"), ({"x": ["trainer.temperature=1"]}, "name its rule")):
        with pytest.raises(UserError, match=word):
            Reproduction("mt", "tiny", tmp_path, extra_arms=bad)


def test_an_extra_arm_with_a_blind_twin_is_tested_against_it(tmp_path):
    """--arm X=... --arm X_blind=...: the bootstrap pairs X_blind with X, and the verdict says what X's weights add."""
    from mleps_lab.reproduce_report import significance, verdict

    good = [r[0] for r in REFS]
    bad = ["a man rides a bike", "dogs in snow", "a woman reads", "children swim"] * 10
    rows = []
    for arm, hyps in (("mle", bad), ("mgs", bad), ("mgs_blind", bad), ("wide", good), ("wide_blind", bad)):
        path = tmp_path / f"{arm}.txt"
        path.write_text("\n".join(hyps) + "\n", encoding="utf-8")
        rows.append({"budget": "equal_time", "arm": arm, "seed": 0, "test": {"greedy": {"predictions": str(path)}}})
    pairs = significance(rows, REFS, "bleu")["equal_time"]["0"]
    assert pairs["wide_blind vs wide"]["bleu"]["delta"] < -30 and pairs["wide_blind vs wide"]["bleu"]["p"] < 0.01
    assert "mgs_blind vs mgs_blind" not in pairs and "wide vs wide" not in pairs
    sentences = verdict({"significance": {"equal_time": {"0": pairs}}, "metric": "bleu", "summary": {}})
    assert any(s.startswith("At equal time: wide beats wide_blind") for s in sentences), sentences


def test_run_row_leaves_the_held_out_diagnostic_out_of_the_step_time(tmp_path):
    from mleps_lab.reproduce_report import run_row

    events = [{"step": 0, "split": "validation", "score": 30.0, "train_s": 0.0}]
    for step, diag in ((1, None), (2, 0.5), (3, None), (4, 0.1)):
        e = {"step": step, "split": "train", "step_s": 2.0 + (5.0 if diag is not None else 0.0), "train_s": 2.0 * step,
             "ess": 3.0, "guided_weight": 0.5, "best_improvement": 0.01, "task_loss": 0.6, "perturbed_loss_mean": 0.6}
        if diag is not None:
            e.update(diagnose_s=5.0, diag_rank_correlation=diag, diag_taken_minus_blind=-diag / 10)
        events.append(e)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    row = run_row(tmp_path)
    assert row["s_per_step"] == pytest.approx(2.0)
    assert row["diagnostics"]["rank_corr"] == pytest.approx(0.3)  # the two steps that ran it
    assert row["diagnostics"]["taken_minus_blind"] == pytest.approx(-0.03)


def test_an_extra_arm_that_changes_only_weights_or_noise_shares_mgs_calibration(tmp_path):
    mgs = ["trainer=mgs", "trainer.warm_start_steps=0"]
    repro = Reproduction("mt", "tiny", tmp_path, extra_arms={
        "wide": [*mgs, "trainer.noise_scale=30", "trainer.diagnose_every=2"],
        "wide_blind": [*mgs, "trainer.noise_scale=30", "trainer.weighting=uniform"],
        "mirrored": [*mgs, "trainer.antithetic=true"],  # the same K decodes, the noise drawn in pairs
        "big_k": [*mgs, "trainer.num_samples=8"]})
    assert repro.cost_of == {"mgs_blind": "mgs", "wide": "mgs", "wide_blind": "mgs", "mirrored": "mgs"}
    assert repro.calibration_rules() == ["mle", "pg", "grpo", "mrt", "mgs", "big_k"]  # more samples cost more: timed


def test_an_oracle_arm_is_calibrated_itself_and_keeps_its_validation_rows(tmp_path):
    """trainer.oracle_rows decodes validation rows every step: it costs more than MGS, and its calibration
    runs (which validate nothing) still need the validation file and the subset its rows avoid."""
    repro = Reproduction("mt", "tiny", tmp_path, extra_arms={
        "oracle": ["trainer=mgs", "trainer.warm_start_steps=0", "trainer.oracle_rows=[32,64]"]})
    assert "oracle" in repro.calibration_rules()
    argv = next(job.argv for job in repro.stage_calibration() if job.name.startswith("calibration/oracle"))
    last = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in argv if "=" in o}  # the last of each key wins
    assert last.get("data.validation_file") != "null"
    assert last["data.max_eval_examples"] == str(repro.budget.arm_eval_examples)
    assert int(last["trainer.eval_every"]) > repro.budget.calibration_steps
    mgs_argv = next(job.argv for job in repro.stage_calibration() if job.name.startswith("calibration/mgs-"))
    assert "data.validation_file=null" in mgs_argv


def test_a_stage_of_one_job_gets_every_core_and_a_shared_stage_splits_them(monkeypatch):
    from mleps_lab.reproduce import Runner

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert Runner.env_for(1)["OMP_NUM_THREADS"] == "4"
    assert Runner.env_for(2)["OMP_NUM_THREADS"] == "2" and Runner.env_for(8)["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("task", ["mt", "summarization", "completion"])
def test_the_base_and_every_arm_train_on_the_same_pairs_and_batch(tmp_path, task):
    """A base trained on a subset, or with another batch, than its arms would make "continued MLE"
    something else than continuing the base's training."""
    repro = Reproduction(task, "cpu", tmp_path)

    def setting(argv):  # the last override of each key wins, as in Hydra
        return {o.split("=", 1)[0]: o for o in argv if o.split("=", 1)[0] in ("data.max_train_examples",
                                                                              "trainer.batch_size")}

    base = setting(repro.stage_base()[0].argv)
    for arm in repro.task.arms:
        assert setting(repro.rule_overrides(arm, 10, seed=0, lr=1e-4)) == base, arm


def test_the_summarization_base_stops_on_cross_entropy(tmp_path):
    argv = Reproduction("summarization", "cpu", tmp_path).stage_base()[0].argv
    assert "eval.select=cross_entropy" in argv and "trainer.patience=3" in argv


def test_a_killed_stage_keeps_the_time_of_its_finished_jobs(tmp_path):
    """The wall time is written after every job: a stage that stops half-way (killed, or a run that
    fails) still counts the jobs that finished, and the next invocation adds to it."""
    from mleps_lab.reproduce import Job, RunFailed

    def job(name, module):
        done = tmp_path / f"{name}.done"
        return Job(name, [module, "--help"], done, tmp_path / f"{name}.log", after=lambda j: j.done_file.touch())

    repro = Reproduction("mt", "tiny", tmp_path / "out", jobs=1, progress=False)
    repro.stages = lambda: [("test", lambda: [job("ok", "json.tool"), job("bad", "no_such_module_here")])]
    with pytest.raises(RunFailed):
        repro.run()
    first = repro.stage_seconds()["test"]
    assert first > 0
    with pytest.raises(RunFailed):  # resumed: "ok" is done and skipped, "bad" fails again
        repro.run()
    assert repro.stage_seconds()["test"] == first  # no job finished this time: nothing added


def test_grpo_is_tested_against_pg(tmp_path):
    """GRPO against PG is the pair that says what group advantages and the KL anchor add to REINFORCE."""
    from mleps_lab.reproduce_report import significance, verdict

    good = [r[0] for r in REFS]
    bad = ["a man rides a bike", "dogs in snow", "a woman reads", "children swim"] * 10
    rows = []
    for arm, hyps in (("mle", bad), ("pg", bad), ("grpo", good), ("mgs", bad)):
        path = tmp_path / f"{arm}.txt"
        path.write_text("\n".join(hyps) + "\n", encoding="utf-8")
        rows.append({"budget": "equal_time", "arm": arm, "seed": 0, "test": {"greedy": {"predictions": str(path)}}})
    pairs = significance(rows, REFS, "bleu")["equal_time"]["0"]
    assert pairs["grpo vs pg"]["bleu"]["delta"] > 30 and pairs["grpo vs pg"]["bleu"]["p"] < 0.01
    assert "pg vs grpo" not in pairs and "mle vs pg" not in pairs and "mgs vs pg" not in pairs
    sentences = verdict({"significance": {"equal_time": {"0": pairs}}, "metric": "bleu", "summary": {}})
    assert "At equal time: GRPO beats PG on test BLEU (greedy)" in " ".join(sentences), sentences


def _results(arms):
    rows = [{"budget": "equal_steps", "arm": a, "seed": 0, "test": {}} for a in arms]
    pairs = {f"{a} vs mgs": {"bleu": {"delta": 1.0, "p": 0.001}} for a in arms if a != "mgs"}
    return {"task": "mt", "metric": "bleu", "seeds": [0], "runs": rows, "summary": {"equal_steps": {
        a: {"test_greedy": [20.0 + i, 0.0]} for i, a in enumerate(arms)}},
        "significance": {"equal_steps": {"0": pairs}}, "verdict": ["raw"]}


def test_mgs_without_its_controls_is_left_out_of_the_report():
    """An MGS number is reported only beside MGS-blind and continued MLE of the same run; the JSON keeps it."""
    from mleps_lab.reproduce_report import reportable

    results = _results(["pg", "grpo", "mgs"])
    shown = reportable(results)
    assert shown["withheld"] == {"arms": ["mgs"], "missing": ["mle", "mgs_blind"]}
    assert [r["arm"] for r in shown["runs"]] == ["pg", "grpo"] and set(shown["summary"]["equal_steps"]) == {"pg", "grpo"}
    assert shown["significance"]["equal_steps"]["0"] == {}
    assert shown["verdict"] == ["At equal steps: GRPO minus PG on test BLEU (greedy): mean Δ +1.00 over 1 seeds "
                                "(no paired test of the two in this run)."]
    assert [r["arm"] for r in results["runs"]] == ["pg", "grpo", "mgs"] and results["verdict"] == ["raw"]
    controlled = _results(["mle", "pg", "mgs", "mgs_blind"])
    assert reportable(controlled) is controlled


def test_a_report_renders_again_from_its_json(tmp_path):
    """python -m mleps_lab.reproduce_report: the committed mt-grpo report, whose runs are gone, from its JSON."""
    from mleps_lab.reproduce_report import main

    source = json.loads((REPO / "docs" / "results" / "mt-grpo.json").read_text())
    source.pop("command", None)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(source))
    argv = [str(path), "--results-md", str(tmp_path / "r.md"), "--img-dir", str(tmp_path / "img")]
    with pytest.raises(SystemExit, match="does not record the command"):
        main(argv)
    assert not (tmp_path / "r.md").exists()
    main(argv + ["--command", "python scripts/reproduce.py mt --arms mgs pg grpo"])
    md = (tmp_path / "r.md").read_text()
    assert "Not reported: MGS" in md and "\n| GRPO | 8 |" in md
    assert md.count("\n| MGS |") == 1 and "\n| MGS | 5.030 | 18 | 18 |" in md  # its calibration row only
    assert "Rendered again from that JSON by `python -m mleps_lab.reproduce_report" in md
    again = json.loads(path.read_text())
    assert again["runs"] == source["runs"] and again["command"] == "python scripts/reproduce.py mt --arms mgs pg grpo"
    assert {p.name for p in (tmp_path / "img").iterdir()} == {"mt-equal_time.png", "mt-equal_steps.png"}


@pytest.mark.parametrize("preload", [False, True])
def test_both_launchers_run_a_job_as_python_m_would(tmp_path, monkeypatch, preload):
    """A fresh interpreter (the documented runs) and a fork of the preloading server (--preload, the tests):
    the job sees its own environment, working folder, path and argv, its output goes to its log, and a
    failing job's exit code and last line reach the driver's error."""
    from mleps_lab.reproduce import Job, Runner

    done = tmp_path / "done.txt"
    (tmp_path / "job_module.py").write_text(
        f"import os, sys; print(os.environ['MLEPS_TEST_MARK'], os.getcwd(), sys.argv[1:], flush=True)\n"
        f"if sys.argv[1:] == ['fail']: print('error: it failed', file=sys.stderr); sys.exit(2)\n"
        f"open({str(done)!r}, 'w').write('x')\n")
    monkeypatch.setenv("MLEPS_TEST_MARK", "seen")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner = Runner(jobs=2, progress=False, preload=preload)
    ok = Job("ok", ["job_module", "a=1"], done, tmp_path / "logs" / "ok.log")
    runner.run_stage("test", [ok])
    assert f"seen {REPO} ['a=1']" in ok.log.read_text()
    bad = Job("bad", ["job_module", "fail"], tmp_path / "never", tmp_path / "logs" / "bad.log")
    with pytest.raises(UserError, match=r"bad failed \(exit 2\): error: it failed"):
        runner.run_stage("test", [bad])

"""Nothing lost, nothing silent: every case of docs/failure-behaviour.md's table that is not a
kill or a resume (those are in test_resume.py / test_checkpoint.py / test_nonfinite.py).

Runs go through the real CLI entry point in-process (conftest.run_main) on 40 local pairs
and the tiny model, so each costs a second or two.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import CONF_DIR, TINY_CLI, assert_user_error, read_jsonl, run_main, write_jsonl
from mleps.errors import UserError


def train(capfd, pairs, run: Path, *overrides: str):
    train_file, dev_file = pairs
    return run_main("mleps.train", "trainer=mle", *TINY_CLI, "trainer.max_steps=2", "trainer.batch_size=4",
                    "trainer.eval_every=2", "data=local", f"data.train_file={train_file}",
                    f"data.validation_file={dev_file}", "decode.max_new_tokens=8", f"output_dir={run}",
                    *overrides, capfd=capfd)


def snapshot(run: Path) -> dict:
    """Every file of a run (except Hydra's own .hydra/ and log) and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


_FINISHED: dict[str, Path] = {}


@pytest.fixture
def finished_run(tmp_path, tmp_path_factory, capfd, pairs):
    """A copy of one finished 2-step run (trained once per module: the machine is slow and shared)."""
    if "run" not in _FINISHED:
        first = tmp_path_factory.mktemp("finished") / "run"
        code, _, err = train(capfd, pairs, first)
        assert code == 0, err
        assert (first / "checkpoints" / "last" / "trainer_state.json").is_file() and (first / "config.yaml").is_file()
        _FINISHED["run"] = first
    run = tmp_path / "run"
    shutil.copytree(_FINISHED["run"], run)
    return run


# -- 1. overwrite=true never loses the old run --------------------------------------------------


@pytest.mark.parametrize("bad", ["data_dir=/nonexistent", "metric.level=foo", "trainer.density=x",
                                 "trainer.batch_size=0", "decode.num_beams=0"])
def test_overwrite_with_a_bad_input_keeps_the_old_run_byte_for_byte(finished_run, capfd, pairs, bad):
    before = snapshot(finished_run)
    if bad.startswith("data_dir"):  # the data files themselves missing
        pairs = (Path("/nonexistent/train.jsonl"), pairs[1])
    code, _, err = train(capfd, pairs, finished_run, "overwrite=true", *([] if bad.startswith("data_dir") else [bad]))
    if bad == "trainer.density=x":  # not an MLE option: Hydra refuses the key before anything runs
        assert code == 2 and "error:" in err
    else:
        assert_user_error(code, err)
    assert snapshot(finished_run) == before


def test_overwrite_that_fails_during_training_puts_the_old_run_back(finished_run, capfd, pairs, monkeypatch):
    from mleps.trainers.mle import MLE

    before = snapshot(finished_run)

    def broken(self, batch, step, shard=None):
        raise RuntimeError("a bug in a rule")

    monkeypatch.setattr(MLE, "step", broken)
    with pytest.raises(RuntimeError, match="a bug in a rule"):
        train(capfd, pairs, finished_run, "overwrite=true", "trainer.eval_every=100")
    assert snapshot(finished_run) == before
    assert not (finished_run / ".previous-run").exists()


def test_a_successful_overwrite_replaces_the_run_and_keeps_no_copy(finished_run, capfd, pairs):
    code, _, err = train(capfd, pairs, finished_run, "overwrite=true", "trainer.max_steps=3", "trainer.eval_every=3")
    assert code == 0, err
    assert not (finished_run / ".previous-run").exists()
    assert json.loads((finished_run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 3
    assert [e["step"] for e in read_jsonl(finished_run / "metrics.jsonl") if e["split"] == "train"] == [3]  # not the old run's 2


def test_the_already_holds_a_run_message_does_not_hide_what_overwrite_does(finished_run, capfd, pairs):
    code, _, err = train(capfd, pairs, finished_run)
    assert_user_error(code, err, "resume=true", "overwrite=true", "kept until the new one saves")


# -- 2. resume refuses a different config -------------------------------------------------------


def test_resume_with_another_trainer_or_lr_is_refused_listing_the_differences(finished_run, capfd, pairs):
    before = snapshot(finished_run)
    code, _, err = train(capfd, pairs, finished_run, "resume=true", "trainer.lr=0.5", "seed=3")
    line = assert_user_error(code, err, "trainer.lr: 0.001 -> 0.5", "seed: 0 -> 3", "config.yaml")
    assert "max_steps" in line  # names what may change
    code, _, err = run_main("mleps.train", "trainer=pg", *TINY_CLI, "trainer.batch_size=4", "data=local",
                            f"data.train_file={pairs[0]}", f"data.validation_file={pairs[1]}",
                            "decode.max_new_tokens=8", f"output_dir={finished_run}", "resume=true", capfd=capfd)
    assert_user_error(code, err, "trainer.name: 'mle' -> 'pg'")
    assert snapshot(finished_run) == before


def test_resume_may_extend_max_steps_and_change_reporting(finished_run, capfd, pairs):
    code, _, err = train(capfd, pairs, finished_run, "resume=true", "trainer.max_steps=4", "trainer.eval_every=4",
                         "trainer.log_every=2", "decode.batch_size=3")
    assert code == 0, err
    assert json.loads((finished_run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 4


def test_resume_of_a_path_that_holds_no_run_fails_and_creates_nothing(tmp_path, capfd, pairs):
    typo = tmp_path / "runs" / "tyop"
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, f"resume={typo}", capfd=capfd)
    assert_user_error(code, err, f"resume={typo}", "no run there")
    assert not typo.exists()


# -- 4/5. numbers and choices are checked at start ------------------------------------------------


@pytest.mark.parametrize("override,needle", [
    ("trainer.batch_size=0", "trainer.batch_size=0"), ("trainer.eval_every=0", "trainer.eval_every"),
    ("trainer.save_every=0", "trainer.save_every"), ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.lr=-1", "trainer.lr=-1"), ("decode.max_new_tokens=0", "decode.max_new_tokens"),
    ("decode.num_beams=0", "decode.num_beams"), ("decode.batch_size=0", "decode.batch_size"),
    ("seed=-1", "seed=-1"), ("data.max_train_examples=0", "data.max_train_examples"),
    ("model.heads=3", "does not divide"), ("mixed_precision=fp8", "mixed_precision"),
    ("mixed_precision=fp16", "bf16"), ("trainer.max_steps=-1", "trainer.max_steps=-1"),
    ("data.max_source_length=0", "data.max_source_length"), ("trainer.patience=0", "trainer.patience"),
    ("trainer.schedule=wavy", "trainer.schedule"), ("trainer.betas=[0.9,1.5]", "trainer.betas"),
    ("+trainer.lrr=0.1", "trainer.lrr"),
])
def test_a_bad_number_or_choice_fails_at_start_and_writes_nothing(tmp_path, capfd, pairs, override, needle):
    run = tmp_path / "run"
    code, _, err = train(capfd, pairs, run, override)
    assert_user_error(code, err, needle)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,needle", [
    ("trainer.density=typo", "trainer.density=typo; Invalid value 'typo', expected one of [fixed_norm"),
    ("trainer.guide=nope", "trainer.guide=nope"),
    ("trainer.perturb=x", "trainer.perturb=x"), ("trainer.warm_start_schedule=x", "trainer.warm_start_schedule 'x'"),
    ("trainer.num_samples=0", "num_samples"),
])
def test_a_bad_option_of_the_main_phase_fails_before_the_warm_start(tmp_path, capfd, pairs, override, needle):
    """The default job (800 MLE steps, then MGS): a typo in an MGS option used to fail after the warm start."""
    run = tmp_path / "run"
    train_file, dev_file = pairs
    code, _, err = run_main("mleps.train", "trainer=mgs", *TINY_CLI, "data=local", f"data.train_file={train_file}",
                            f"output_dir={run}", override, capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (run / "metrics.jsonl").exists()


def test_pg_and_mrt_options_are_checked_at_start_too(tmp_path, capfd, pairs):
    for override, needle in [("trainer=pg", "trainer.baseline=x"), ("trainer=mrt", "trainer.sharpness=-1")]:
        code, _, err = run_main("mleps.train", override, needle, *TINY_CLI, "data=local",
                                f"data.train_file={pairs[0]}", f"output_dir={tmp_path / 'run'}", capfd=capfd)
        assert_user_error(code, err, needle.split("=")[0])


# -- 3. damaged inputs give one line, not a traceback ------------------------------------------------


def test_a_truncated_model_file_is_one_line_for_resume_init_from_and_evaluate(finished_run, capfd, pairs, tmp_path):
    weights = finished_run / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = train(capfd, pairs, finished_run, "resume=true")
    assert_user_error(code, err, "could not load checkpoint", "truncated or corrupt")
    code, _, err = train(capfd, pairs, tmp_path / "other", f"init_from={weights.parent}")
    assert_user_error(code, err, "truncated or corrupt")
    code, _, err = run_main("mleps.evaluate", f"checkpoint={weights.parent}", "data=local",
                            f"data.train_file={pairs[0]}", f"data.test_file={pairs[1]}", "progress=false", capfd=capfd)
    assert_user_error(code, err, "truncated or corrupt")


def test_a_garbled_trainer_state_is_one_line_and_the_run_is_left_alone(finished_run, capfd, pairs):
    (finished_run / "checkpoints" / "last" / "trainer_state.json").write_text('{"step": 2, "best')
    before = snapshot(finished_run)
    code, _, err = train(capfd, pairs, finished_run, "resume=true")
    line = assert_user_error(code, err, "trainer_state.json is unreadable")
    assert "overwrite=true" not in line  # the hint must not point at a command that deletes the run
    assert snapshot(finished_run) == before


def test_a_checkpoint_without_tokenizer_files_is_one_line(finished_run, capfd, pairs, tmp_path):
    ckpt = finished_run / "checkpoints" / "best"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    code, _, err = train(capfd, pairs, tmp_path / "other", f"init_from={ckpt}")
    assert_user_error(code, err, str(ckpt))


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capfd, pairs):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    code, _, err = train(capfd, pairs, target)
    assert_user_error(code, err, "a_file")
    assert target.read_text() == "not a folder"


def test_an_unwritable_output_dir_is_one_line(tmp_path, pairs, monkeypatch):
    """Root may write anywhere, so the permission is taken away through os.access as well as chmod."""
    from omegaconf import OmegaConf

    from mleps import rundir

    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: Path(path) != run)
    cfg = OmegaConf.create({"resume": False, "overwrite": False})
    try:
        with pytest.raises(UserError, match="is not writable"):
            rundir.check_run_dir(cfg, run)
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize("error", [
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })",
    "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed",
])
def test_a_full_disk_says_no_space_left_on_device_not_the_library_internals(tmp_path, monkeypatch, error):
    import shutil

    from safetensors import SafetensorError

    from mleps import checkpoint as ckpt

    if error.startswith("Error"):
        e = SafetensorError(error)
    else:
        e = RuntimeError(error)
        # torch does not say why: a nearly full disk is the cause the message names
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    assert ckpt.write_error(e, tmp_path) == "No space left on device"


def test_another_torch_write_error_keeps_its_reason_without_the_cpp_location(tmp_path, monkeypatch):
    import shutil

    from mleps import checkpoint as ckpt

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**8, 9 * 10**8))
    e = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0")
    assert ckpt.write_error(e, tmp_path) == "PytorchStreamWriter failed writing file data/0"


# -- 7. silent surprises -----------------------------------------------------------------------------


def test_init_from_with_mgs_does_not_retrain_the_checkpoint_unless_asked(finished_run, capfd, pairs, tmp_path):
    ckpt = finished_run / "checkpoints" / "last"
    common = ["trainer=mgs", *TINY_CLI, "trainer.max_steps=1", "trainer.batch_size=4", "trainer.num_samples=2",
              "trainer.max_new_tokens=6", "trainer.eval_every=1", "data=local", f"data.train_file={pairs[0]}",
              f"data.validation_file={pairs[1]}", "decode.max_new_tokens=6", f"init_from={ckpt}"]
    code, out, err = run_main("mleps.train", *common, f"output_dir={tmp_path / 'a'}", capfd=capfd)
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == ["main"]
    code, out, err = run_main("mleps.train", *common, "trainer.warm_start_steps=1", "trainer.warm_start_eval_every=1",
                              f"output_dir={tmp_path / 'b'}", capfd=capfd)
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [(p["phase"], p["steps"]) for p in summary["phases"]] == [("warm_start", 1), ("main", 1)]


def test_multirun_writes_into_output_dir():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/runs/sweep"], return_hydra_config=True)
        assert cfg.hydra.sweep.dir == "/runs/sweep"
        assert cfg.hydra.run.dir == "/runs/sweep"


def test_evaluate_on_two_local_test_sets_writes_two_prediction_files(tmp_path):
    from omegaconf import OmegaConf

    from mleps.evaluate import default_predictions_name

    names = set()
    for file in (tmp_path / "a" / "test.jsonl", tmp_path / "b" / "test.jsonl", tmp_path / "a" / "other.jsonl"):
        names.add(default_predictions_name(OmegaConf.create({"name": "local", "test_file": str(file)}), "test"))
    assert len(names) == 3 and all(n.startswith("predictions-local-test-") for n in names)


def test_a_run_without_validation_file_says_there_will_be_no_best(tmp_path, capfd, pairs, caplog):
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, "trainer.max_steps=1", "trainer.batch_size=4",
                            "data=local", f"data.train_file={pairs[0]}", f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert code == 0, err
    assert any("no checkpoints/best" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()


def test_the_summary_counts_the_steps_that_ran(tmp_path, capfd, pairs):
    """trainer.max_train_s stops the phase after its first step: the table says 1, not 50."""
    code, out, err = train(capfd, pairs, tmp_path / "run", "trainer.max_steps=50", "trainer.max_train_s=1e-9",
                           "trainer.eval_every=100")
    assert code == 0, err
    phase = json.loads((tmp_path / "run" / "summary.json").read_text())["phases"][0]
    assert (phase["steps"], phase["configured_steps"]) == (1, 50)


def test_a_list_in_a_text_column_is_refused(tmp_path, capfd):
    f = write_jsonl(tmp_path / "lists.jsonl", [{"source": ["a", "b"], "target": "c"}] * 8)
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, "data=local", f"data.train_file={f}",
                            f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, "column 'source'", "lists")


def test_the_nan_stop_names_the_step_as_metrics_jsonl_does_and_the_best_checkpoint(tmp_path):
    from mleps.errors import TrainingDiverged
    from mleps.loop import Loop

    loop = Loop.__new__(Loop)
    loop.ckpt_dir = tmp_path / "checkpoints"
    (loop.ckpt_dir / "best").mkdir(parents=True)
    (loop.ckpt_dir / "best" / "trainer_state.json").write_text("{}")
    loop.state = {"bad_steps_total": 0, "bad_steps_in_a_row": 0}
    with pytest.raises(TrainingDiverged) as err:
        loop._count_bad_step(0, max_bad_steps=1)  # the first step: logged as step 1
    assert "up to step 1," in str(err.value) and "the best is" in str(err.value)

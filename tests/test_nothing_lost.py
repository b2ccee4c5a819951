"""Nothing lost: evaluate never writes into a checkpoint, resume never wipes a run, one run dir has one
writer, and a refused run leaves the run dir as it was (docs/failure-behaviour.md).

Runs go through the real CLI entry points in-process (conftest.run_main) on 40 local pairs and the tiny
model; one 3-step run is trained per module and copied for each test.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from conftest import TINY_CLI, assert_user_error, read_jsonl, run_main, write_jsonl


def train(capfd, pairs, run: Path, *overrides: str):
    train_file, dev_file = pairs
    return run_main("mleps.train", "trainer=mle", *TINY_CLI, "trainer.max_steps=3", "trainer.batch_size=4",
                    "trainer.eval_every=3", "trainer.save_every=1", "data=local", f"data.train_file={train_file}",
                    f"data.validation_file={dev_file}", "decode.max_new_tokens=8", f"output_dir={run}",
                    *overrides, capfd=capfd)


def evaluate(capfd, pairs, checkpoint: Path, *overrides: str):
    return run_main("mleps.evaluate", f"checkpoint={checkpoint}", "split=test", f"data.test_file={pairs[1]}",
                    "data.max_eval_examples=4", "decode.max_new_tokens=4", "progress=false", *overrides, capfd=capfd)


def hashes(run: Path) -> dict:
    """Every file under the run dir and a hash of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


_FINISHED: dict[str, Path] = {}


@pytest.fixture
def finished_run(tmp_path, tmp_path_factory, capfd, pairs):
    """A copy of one finished 3-step run (trained once per module)."""
    if "run" not in _FINISHED:
        first = tmp_path_factory.mktemp("finished") / "run"
        code, _, err = train(capfd, pairs, first)
        assert code == 0, err
        _FINISHED["run"] = first
    run = tmp_path / "run"
    shutil.copytree(_FINISHED["run"], run)
    return run


# -- evaluate never writes into a checkpoint ----------------------------------------------------------


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "new-file.txt", "", "sub/preds.txt"])
def test_evaluate_refuses_a_predictions_path_inside_the_checkpoint(finished_run, capfd, pairs, target):
    ckpt = finished_run / "checkpoints" / "last"
    before = hashes(finished_run)
    code, _, err = evaluate(capfd, pairs, ckpt, f"predictions={ckpt / target if target else ckpt}")
    assert_user_error(code, err, "inside the checkpoint folder", "pass a path outside it")
    assert hashes(finished_run) == before  # no replaced weights, no stray last.tmp beside the folder
    assert not (finished_run / "checkpoints" / "last.tmp").exists()


def test_evaluate_refuses_a_folder_and_a_run_file_as_predictions(finished_run, capfd, pairs, tmp_path):
    ckpt = finished_run / "checkpoints" / "last"
    before = hashes(finished_run)
    (tmp_path / "folder").mkdir()
    code, _, err = evaluate(capfd, pairs, ckpt, f"predictions={tmp_path / 'folder'}")
    assert_user_error(code, err, "is a folder")
    code, _, err = evaluate(capfd, pairs, ckpt, f"predictions={finished_run / 'metrics.jsonl'}")
    assert_user_error(code, err, "a file of the run")
    assert hashes(finished_run) == before and not list(tmp_path.glob("*.tmp"))


def test_evaluations_with_other_settings_write_other_default_files(finished_run, capfd, pairs):
    ckpt = finished_run / "checkpoints" / "last"
    paths = []
    for extra in ([], ["decode.num_beams=2"], ["metric=chrf"], ["data.max_eval_examples=3"]):
        code, out, err = evaluate(capfd, pairs, ckpt, *extra)
        assert code == 0, err
        paths.append(json.loads(out.strip().splitlines()[-1])["predictions"])
    assert len(set(paths)) == 4, paths
    assert all(Path(p).is_file() and Path(p).name.startswith("predictions-local-test-") for p in paths)
    code, out, err = evaluate(capfd, pairs, ckpt)  # the same settings again: the same file
    assert json.loads(out.strip().splitlines()[-1])["predictions"] == paths[0]


# -- resume never wipes a run ---------------------------------------------------------------------------------


def _pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"state": object}))


@pytest.mark.parametrize("damage,needles", [
    (lambda last: (last / "trainer_state.json").unlink(), ("checkpoints/last is incomplete", "trainer_state.json",
                                                           "overwrite=true")),
    (lambda last: shutil.rmtree(last), ("no checkpoints/last", "checkpoints/best (step 0)", "metrics.jsonl",
                                        "overwrite=true", "init_from=")),
    (lambda last: (last / "optimizer.pt").unlink(), ("optimizer.pt is missing or unreadable",)),
    (lambda last: _pickle(last / "optimizer.pt"), ("optimizer.pt is missing or unreadable",)),
    (lambda last: (last / "rng.pt").write_bytes(b"truncated"), ("rng.pt is missing or unreadable",)),
], ids=["no-trainer-state", "no-last", "no-optimizer", "pickled-optimizer", "garbled-rng"])
def test_resume_of_an_incomplete_run_is_refused_and_changes_nothing(finished_run, capfd, pairs, damage, needles):
    """No checkpoint, metrics.jsonl, config.yaml or .hydra/ is deleted or rewritten: every refusal comes before
    the run dir is touched, even with a changed resumable key (trainer.max_steps)."""
    damage(finished_run / "checkpoints" / "last")
    before = hashes(finished_run)
    code, _, err = train(capfd, pairs, finished_run, "resume=true", "trainer.max_steps=4")
    assert_user_error(code, err, *needles)
    assert hashes(finished_run) == before


def test_resume_of_a_run_that_holds_nothing_yet_starts_it(tmp_path, capfd, pairs):
    """Killed during setup, after config.yaml was written and before any event: resume=true starts it."""
    run = tmp_path / "run"
    code, _, err = train(capfd, pairs, run)
    assert code == 0, err
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    code, _, err = train(capfd, pairs, run, "resume=true")
    assert code == 0, err
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 3


# -- one run dir, one writer ------------------------------------------------------------------------------------


def _write_lock(run: Path, pid: int, host: str | None = None) -> Path:
    from mleps.rundir import LOCK_FILE

    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 0}))
    return path


def test_a_run_dir_in_use_by_a_live_process_is_refused_naming_it(finished_run, capfd, pairs, tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for run, extra in ((finished_run, ["resume=true", "trainer.max_steps=4"]), (tmp_path / "fresh", [])):
            lock = _write_lock(run, holder.pid)
            before = hashes(run)
            code, _, err = train(capfd, pairs, run, *extra)
            assert_user_error(code, err, "in use by another run", f"pid {holder.pid}", socket.gethostname())
            assert hashes(run) == before and lock.is_file()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_from_another_host_is_refused_naming_the_file(tmp_path, capfd, pairs):
    lock = _write_lock(tmp_path / "run", 12345, host="elsewhere")
    code, _, err = train(capfd, pairs, tmp_path / "run")
    assert_user_error(code, err, "pid 12345 on host elsewhere", f"delete {lock}")


def test_a_stale_lock_is_taken_over_and_the_lock_is_held_during_the_run(tmp_path, capfd, pairs, monkeypatch, caplog):
    import subprocess
    import sys

    from mleps import rundir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    lock = _write_lock(run, dead.pid)
    held = []
    ready = rundir.run_dir_ready
    monkeypatch.setattr(rundir, "run_dir_ready", lambda d: (held.append(json.loads(lock.read_text())), ready(d)))
    with caplog.at_level("WARNING", logger="mleps"):
        code, _, err = train(capfd, pairs, run)
    assert code == 0, err
    assert f"stale lock (pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    assert held and held[0]["pid"] == os.getpid() and held[0]["host"] == socket.gethostname()
    assert not lock.exists()  # released at the end


def test_saving_keeps_another_process_s_temporary_folder(tmp_path):
    """Only the temporary folders of processes that are gone are cleaned up by a save."""
    from mleps.checkpoint import _stale_temporary

    live = tmp_path / f".best.tmp-{os.getpid()}"
    other_live = tmp_path / f".best.tmp-{os.getppid()}"
    gone = tmp_path / ".best.tmp-999999999"
    assert not _stale_temporary(other_live) and _stale_temporary(gone) and _stale_temporary(live)


# -- a refused run leaves the run dir as it was ---------------------------------------------------------------


def test_a_refused_run_in_a_fresh_folder_leaves_nothing(tmp_path, capfd, pairs):
    run = tmp_path / "fresh"
    code, _, err = train(capfd, pairs, run, "trainer.batch_size=0")
    assert_user_error(code, err, "trainer.batch_size=0")
    assert not run.exists() or not any(run.iterdir())


def test_the_run_log_is_held_until_the_run_dir_is_ready(tmp_path):
    import logging

    from mleps.runlog import RunLogHandler, open_run_logs

    handler = RunLogHandler(str(tmp_path / "train.log"))
    record = logging.LogRecord("mleps", logging.INFO, __file__, 1, "before the checks", None, None)
    handler.emit(record)
    assert not (tmp_path / "train.log").exists()  # a refused run writes nothing
    open_run_logs(tmp_path)
    handler.emit(logging.LogRecord("mleps", logging.INFO, __file__, 1, "after", None, None))
    handler.close()
    assert (tmp_path / "train.log").read_text().splitlines() == ["before the checks", "after"]


def test_a_task_loss_that_raises_at_start_is_one_line(tmp_path, capfd, pairs, monkeypatch):
    (tmp_path / "badloss_inproc.py").write_text("def fn(decoded):\n    raise ValueError('my loss is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    code, _, err = train(capfd, pairs, run, "metric=custom", "metric.fn=badloss_inproc:fn")
    assert_user_error(code, err, "metric custom raised ValueError: my loss is broken", "metric.*")
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.slow  # a subprocess (about 15 s): Hydra's own logging, which in-process runs leave out
def test_a_refused_overwrite_leaves_the_old_run_s_log_and_hydra_record_alone(finished_run, pairs, tmp_path):
    """The real CLI with Hydra's logging (a subprocess): the refusal comes after the model was loaded and
    logged, before the run dir is prepared."""
    from conftest import run_cli

    (finished_run / "train.log").write_text("the old run's log\n")
    (tmp_path / "badloss.py").write_text("def fn(decoded):\n    raise ValueError('my loss is broken')\n")
    before = hashes(finished_run)
    code, _, err = run_cli("mleps.train", "trainer=mle", *TINY_CLI, "trainer.max_steps=3", "trainer.batch_size=4",
                           "data=local", f"data.train_file={pairs[0]}", f"data.validation_file={pairs[1]}",
                           f"output_dir={finished_run}", "overwrite=true", "metric=custom", "metric.fn=badloss:fn",
                           env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(code, err, "metric custom", "ValueError: my loss is broken")
    assert hashes(finished_run) == before


# -- a signal at the very end lets the run finish -------------------------------------------------------------


def test_a_signal_during_the_final_evaluation_lets_the_run_finish_as_if_never_signalled(finished_run, tmp_path, capfd,
                                                                                      pairs, monkeypatch):
    import signal

    from mleps.loop import Loop

    evaluate_ = Loop.evaluate

    def signalled(self, step, phase):
        if step == 3:  # the final evaluation (trainer.eval_every=3 = trainer.max_steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate_(self, step, phase)

    monkeypatch.setattr(Loop, "evaluate", signalled)
    run = tmp_path / "signalled"
    code, _, err = train(capfd, pairs, run)
    assert code == 0, err
    assert (run / "summary.json").is_file()
    state = lambda r: {k: v for k, v in json.loads((r / "checkpoints" / "last" / "trainer_state.json").read_text())  # noqa: E731
                       .items() if not k.endswith("_s")}
    assert state(run) == state(finished_run)  # phase_end_scores included


# -- bad input: the cause in one line -------------------------------------------------------------------------


def test_a_malformed_tsv_row_says_what_the_parser_found(tmp_path):
    from omegaconf import OmegaConf

    from mleps.data import load_split
    from mleps.errors import UserError

    path = tmp_path / "bad.tsv"
    path.write_text("source\ttarget\na\tb\nc\td\ne\tf\tg\n")
    cfg = OmegaConf.create({"name": "local", "train_file": str(path), "source_column": "source",
                            "target_column": "target", "reference_columns": []})
    with pytest.raises(UserError, match="Expected 2 fields in line 4, saw 3"):
        load_split(cfg, "train")
    cfg.train_file = str(tmp_path)
    with pytest.raises(UserError, match="is a folder"):
        load_split(cfg, "train")


def test_a_dataset_without_target_names_target_not_the_config_s_columns():
    import datasets
    from omegaconf import OmegaConf

    from mleps.data import load_split
    from mleps.errors import UserError

    cfg = OmegaConf.create({"name": "dataset", "source_column": "de", "target_column": "en", "reference_columns": []})
    with pytest.raises(UserError, match="column 'target' not found") as e:
        load_split(cfg, "train", datasets.Dataset.from_dict({"source": ["a b"], "text": ["c"]}))
    assert "'de'" not in str(e.value)


def test_init_from_without_tokenizer_files_names_them(finished_run, capfd, pairs, tmp_path):
    ckpt = finished_run / "checkpoints" / "best"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    code, _, err = train(capfd, pairs, tmp_path / "other", f"init_from={ckpt}")
    line = assert_user_error(code, err, "no tokenizer files", "tokenizer.json", str(ckpt))
    assert "Config" not in line


def test_a_lora_rank_above_the_width_is_refused(tmp_path, capfd, pairs):
    code, _, err = train(capfd, pairs, tmp_path / "run", "model.peft=lora", "model.lora_r=64")
    assert_user_error(code, err, "model.lora_r=64", "model.d_model=32")


def test_an_error_every_process_of_a_launch_meets_is_said_once(monkeypatch, capsys, tmp_path):
    """Two processes of one torchrun launch (their error files in one attempt folder), then another launch."""
    from mleps.errors import UserError, exit_on_user_error

    monkeypatch.setenv("WORLD_SIZE", "2")

    @exit_on_user_error
    def start():
        raise UserError("the same refusal on every process")

    for launch, rank in (("run_a", 0), ("run_a", 1), ("run_b", 0)):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / launch / "attempt_0" / str(rank) / "error.json"))
        with pytest.raises(SystemExit) as e:
            start()
        assert e.value.code == 2
    assert capsys.readouterr().err.count("error: the same refusal") == 2  # once per launch

"""trackers=[...]: accelerate's experiment trackers get the numbers metrics.jsonl holds, at the same steps,
and a resumed run continues them; a bad or missing tracker is one line at start."""
from __future__ import annotations

import shutil

import pytest

from conftest import TINY_CLI, assert_user_error, compose_cfg, read_jsonl, run_main, write_jsonl
from mleps.validate import tracker_names

TRAIN = ["trainer=mle", *TINY_CLI, "trainer.batch_size=4", "trainer.eval_every=100", "trainer.log_every=1",
         "trainer.save_every=100", "decode.max_new_tokens=6", "data=local"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, multi30k_rows):
    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"source": r["de"], "target": r["en"]} for r in multi30k_rows]
    return [f"data.train_file={write_jsonl(folder / 'train.jsonl', rows[:40])}",
            f"data.validation_file={write_jsonl(folder / 'dev.jsonl', rows[40:44])}"]


def scalars(run, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag as TensorBoard shows it (its orphaned-event purging included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "trackers" / "mleps"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def logged(run, split: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in read_jsonl(run / "metrics.jsonl") if e["split"] == split and key in e]


class _NoCapture:  # run_main in a module fixture, which has no capfd
    def readouterr(self):
        return "", ""


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, pairs):
    """A 2-step run with trackers=[tensorboard]."""
    pytest.importorskip("tensorboard")
    run = tmp_path_factory.mktemp("tb") / "run"
    code, _, err = run_main("mleps.train", *TRAIN, *pairs, "trainer.max_steps=2", "trackers=[tensorboard]",
                            f"output_dir={run}", capfd=_NoCapture())
    assert code == 0, err
    return run


def test_tensorboard_holds_the_numbers_of_metrics_jsonl_at_its_steps(tensorboard_run):
    losses = logged(tensorboard_run, "train", "loss")
    assert [s for s, _ in losses] == [1, 2]
    assert scalars(tensorboard_run, "train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    scores = logged(tensorboard_run, "validation", "score")
    assert [s for s, _ in scores] == [0, 2]
    assert scalars(tensorboard_run, "validation/score") == [(s, pytest.approx(v, rel=1e-6)) for s, v in scores]


@pytest.mark.slow
def test_a_resumed_run_continues_tensorboard_and_hides_what_the_stopped_run_logged_later(
        tensorboard_run, tmp_path, capfd, pairs):
    """A run stopped after logging step 3 but before saving it: its step-2 checkpoint is put back and it
    resumes. TensorBoard then shows step 3 once, the resumed run's, as metrics.jsonl does."""
    run = tmp_path / "run"
    shutil.copytree(tensorboard_run, run)
    shutil.copytree(run / "checkpoints" / "last", tmp_path / "last-at-2")
    resume = [*TRAIN, *pairs, "trainer.max_steps=3", "trackers=[tensorboard]", f"output_dir={run}", "resume=true"]
    code, _, err = run_main("mleps.train", *resume, capfd=capfd)
    assert code == 0, err
    shutil.rmtree(run / "checkpoints" / "last")
    shutil.copytree(tmp_path / "last-at-2", run / "checkpoints" / "last")
    code, _, err = run_main("mleps.train", *resume, capfd=capfd)
    assert code == 0, err
    losses = logged(run, "train", "loss")
    assert [s for s, _ in losses] == [1, 2, 3]
    assert scalars(run, "train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]


def test_tensorboard_true_is_trackers_tensorboard():
    assert tracker_names(compose_cfg("tensorboard=true")) == ["tensorboard"]
    assert tracker_names(compose_cfg("tensorboard=true", "trackers=[tensorboard,wandb]")) == ["tensorboard", "wandb"]
    assert tracker_names(compose_cfg()) == []


@pytest.mark.parametrize("override,needles", [
    ("trackers=[tensorbord]", ["unknown tracker 'tensorbord'", "tensorboard", "trackers=[]"]),
    ("trackers=[all]", ["unknown tracker 'all'"]),
])
def test_an_unknown_tracker_is_one_line_at_start(tmp_path, capfd, pairs, override, needles):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, *pairs, "trainer.max_steps=1", override, f"output_dir={run}",
                            capfd=capfd)
    assert_user_error(code, err, *needles)
    assert not (run / "metrics.jsonl").exists() and not (run / "trackers").exists()


def test_a_tracker_whose_package_is_missing_is_one_line_at_start(tmp_path, capfd, pairs, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as if nothing were installed
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, *pairs, "trainer.max_steps=1", "tensorboard=true",
                            f"output_dir={run}", capfd=capfd)
    assert_user_error(code, err, "tensorboard is not installed", "pip install tensorboard")
    assert not (run / "metrics.jsonl").exists() and not (run / "trackers").exists()


def test_mlflow_gets_the_train_loss_in_a_file_store(tmp_path, capfd, pairs, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (not in the test extra: heavy)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, *pairs, "trainer.max_steps=2", "trackers=[mlflow]",
                            "tracker_project=mleps-test", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("mleps-test").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss"))
    assert history == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged(run, "train", "loss")]


def test_wandb_offline_writes_its_run_into_the_run_dir(tmp_path, capfd, pairs, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (not in the test extra: heavy)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, *pairs, "trainer.max_steps=2", "trackers=[wandb]",
                            f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    assert list((run / "trackers" / "wandb").glob("offline-run-*")), "the offline run is in <run dir>/trackers"

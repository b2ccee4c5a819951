"""The loop's TrainState (trainer_state.json): typed, versioned, and still reading the files written before it
had a version. tests/data/trainer_state_v0.json is such a file, written by mleps.train with OLD_RUN below
(trainer.max_steps=2) before TrainState existed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL, assert_user_error, run_main
from mleps.checkpoint import TRAIN_STATE_VERSION, TrainState, read_train_state
from mleps.errors import UserError

OLD_STATE = Path(__file__).parent / "data" / "trainer_state_v0.json"
OLD_RUN = ["trainer=mle", *TINY_MODEL, "progress=false", "cpu=true", "decode.max_new_tokens=8",
           "trainer.batch_size=4", "trainer.eval_every=1", "trainer.save_every=1", "trainer.log_every=1",
           "data.max_train_examples=32", "data.max_eval_examples=4"]


def untimed(d: dict) -> dict:  # wall-clock numbers differ between any two runs
    return {k: v for k, v in d.items() if not k.endswith("_s")}


def test_a_version_0_state_reads_into_train_state_and_is_written_back_with_its_version():
    raw = json.loads(OLD_STATE.read_text())
    assert "version" not in raw
    state = TrainState.from_dict(raw)
    assert (state.step, state.phase, state.phase_first_steps, state.best_step) == (2, "main", {"main": 0}, 0)
    assert state.early_stopped == {} and state.version == TRAIN_STATE_VERSION
    written = state.to_dict()
    assert written["version"] == TRAIN_STATE_VERSION and untimed(written) == untimed({**raw, **written})
    assert TrainState.from_dict(json.loads(json.dumps(written))) == state


@pytest.mark.parametrize("version", [TRAIN_STATE_VERSION + 1, "1", -1])
def test_an_unknown_version_is_a_user_error(tmp_path, version):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "version": version}))
    with pytest.raises(UserError, match="version"):
        read_train_state(tmp_path)


def test_a_run_saved_before_train_state_resumes_as_one_saved_now(tmp_path, capfd, data_dir):
    """Two identical 2-step runs; one gets the stored old trainer_state.json in checkpoints/last. Both resume
    to step 4: the same events, state and weights."""
    runs = {name: tmp_path / name for name in ("old", "new")}
    for run in runs.values():
        code, _, err = run_main("mleps.train", *OLD_RUN, "trainer.max_steps=2", f"output_dir={run}", capfd=capfd)
        assert code == 0, err
    shutil.copy(OLD_STATE, runs["old"] / "checkpoints" / "last" / "trainer_state.json")
    for run in runs.values():
        code, _, err = run_main("mleps.train", *OLD_RUN, "trainer.max_steps=4", "resume=true", f"output_dir={run}",
                                capfd=capfd)
        assert code == 0, err
    events = {name: [untimed(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
              for name, run in runs.items()}
    assert events["old"] == events["new"] and events["old"][-1]["step"] == 4
    states = {name: json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
              for name, run in runs.items()}
    assert untimed(states["old"]) == untimed(states["new"]) and states["old"]["version"] == TRAIN_STATE_VERSION
    a, b = (load_file(run / "checkpoints" / "last" / "model.safetensors") for run in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_an_unknown_version_is_one_error_line(tmp_path, capfd, data_dir):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *OLD_RUN, "trainer.max_steps=1", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    state = run / "checkpoints" / "last" / "trainer_state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), version=99)))
    code, _, err = run_main("mleps.train", *OLD_RUN, "trainer.max_steps=2", "resume=true", f"output_dir={run}",
                            capfd=capfd)
    assert_user_error(code, err, "version 99", "trainer_state.json")

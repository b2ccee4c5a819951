"""metric=lm scores with a frozen copy of the model a run started from, also after a resume (a bug fixed:
the copy was taken from the resumed weights)."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from conftest import TINY_CLI, assert_user_error, run_main


LM_MGS = ["trainer=mgs", "metric=lm", "metric.reduction=sum", *TINY_CLI, "trainer.warm_start_steps=0",
          "trainer.batch_size=4", "trainer.num_samples=2", "trainer.max_new_tokens=8", "trainer.log_every=1",
          "trainer.eval_every=100", "trainer.save_every=1", "data.max_train_examples=32", "data.max_eval_examples=4",
          "decode.max_new_tokens=8"]


def test_a_resumed_lm_run_scores_with_the_model_it_started_from(tmp_path, capfd, data_dir):
    """metric=lm keeps a frozen copy of the model the run starts from. A resumed run must score with that
    model (checkpoints/run_start), not the weights it resumes from: else its second step's losses, weights
    and update differ from an uninterrupted run's (the bug: the copy was taken from the resumed model)."""
    straight = tmp_path / "straight"
    code, _, err = run_main("mleps.train", *LM_MGS, "trainer.max_steps=2", f"output_dir={straight}", capfd=capfd)
    assert code == 0, err
    resumed = tmp_path / "resumed"
    code, _, err = run_main("mleps.train", *LM_MGS, "trainer.max_steps=1", f"output_dir={resumed}", capfd=capfd)
    assert code == 0, err
    assert (resumed / "checkpoints" / "run_start" / "model.safetensors").is_file()
    code, _, err = run_main("mleps.train", *LM_MGS, "trainer.max_steps=2", "resume=true", f"output_dir={resumed}",
                            capfd=capfd)
    assert code == 0, err
    losses = [[e["task_loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if e["split"] == "train"] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    a = load_file(straight / "checkpoints" / "last" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_an_lm_run_without_its_start_model_is_a_user_error(tmp_path, capfd, data_dir):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *LM_MGS, "trainer.max_steps=1", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    shutil.rmtree(run / "checkpoints" / "run_start")
    code, _, err = run_main("mleps.train", *LM_MGS, "trainer.max_steps=2", "resume=true", f"output_dir={run}",
                            capfd=capfd)
    assert_user_error(code, err, "checkpoints/run_start is missing")

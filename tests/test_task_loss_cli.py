"""Task losses through the CLIs: a custom callable from a temporary module, bad input at start,
several validation metrics in metrics.jsonl and in mleps.evaluate's JSON."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, TINY_CLI, assert_user_error, compose_cfg, read_jsonl, run_cli, run_main

CUSTOM_MODULE = '''
def words(decoded):
    """Loss: words per output / 10 (a length penalty)."""
    return [len(t.split()) / 10 for t in decoded.texts]

def wrong_length(decoded):
    return [0.0]
'''

SMALL = ["data.max_train_examples=64", "data.max_eval_examples=8", "trainer.batch_size=8", "trainer.eval_every=2",
         "trainer.log_every=1", "decode.max_new_tokens=8", *TINY_CLI]


@pytest.mark.slow
def test_custom_loss_from_a_temporary_module_through_the_cli(tmp_path, data_dir):
    (tmp_path / "my_losses.py").write_text(CUSTOM_MODULE)
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli("mleps.train", "trainer=mgs", "trainer.max_steps=2", "trainer.warm_start_steps=0",
                                 "trainer.max_new_tokens=8",
                                 "metric=custom", "metric.fn=my_losses:words", "eval.metrics=[bleu,length]",
                                 *SMALL, f"output_dir={out}", cwd=tmp_path,
                                 env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert rc == 0, stderr[-3000:]
    events = read_jsonl(out / "metrics.jsonl")
    train = [e for e in events if e["split"] == "train"]
    validation = [e for e in events if e["split"] == "validation"]
    assert len(train) == 2 and all(0 <= e["task_loss"] for e in train)
    assert validation and all(e["metric"] == "custom" for e in validation)
    predictions = None
    for e in validation:  # the custom loss is the mean words / 10 of the validation outputs
        assert e["score"] == e["loss"] and 0 <= e["score"] <= 0.8
        assert {"bleu", "length", "cross_entropy", "perplexity"} <= set(e)
    meta = json.loads((out / "checkpoints" / "last" / "mleps.json").read_text())
    assert meta["metric_config"]["fn"] == "my_losses:words" and meta["eval_metrics"] == ["bleu", "length"]
    # mleps.evaluate needs no metric overrides: it scores with the checkpoint's custom loss
    rc, stdout, stderr = run_cli("mleps.evaluate", f"checkpoint={out / 'checkpoints' / 'last'}", "split=validation",
                                 "data.max_eval_examples=8", "progress=false", "decode.max_new_tokens=8", cwd=tmp_path,
                                 env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert rc == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    predictions = (tmp_path / result["predictions"]).read_text().splitlines()
    assert result["metric"] == "custom" and result["n"] == 8 == len(predictions)
    assert result["score"] == pytest.approx(sum(len(p.split()) / 10 for p in predictions) / len(predictions))
    assert {"bleu", "length", "cross_entropy", "perplexity"} <= set(result)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needle", [
    (["metric.name=nope"], "unknown metric 'nope'"),
    (["metric=custom", "metric.fn=no_such_module_xyz:f"], "cannot be imported"),
    (["metric=custom", "metric.fn=my_losses_bad:wrong_length"], "returned 1 values for 2"),
    (["metric=composite", "metric.weights=[1,abc,1]"], "not a number"),
    (["metric=lm", "metric.score_model=/no/such/folder"], "is not a folder"),
    (["eval.metrics=[bleu,nope]"], "unknown metric 'nope'"),
])
def test_bad_task_loss_input_stops_before_any_training(tmp_path, capfd, monkeypatch, data_dir, overrides, needle):
    (tmp_path / "my_losses_bad.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code, _, err = run_main("mleps.train", "trainer=mgs", "trainer.warm_start_steps=2", "trainer.max_steps=2",
                            *overrides, *SMALL, f"data_dir={data_dir}", f"output_dir={out}", capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # no warm start either


@pytest.mark.slow
def test_pg_with_a_corpus_only_loss_is_refused_at_start(tmp_path, capfd, monkeypatch, data_dir):
    """No built-in loss lacks a sentence form, so a custom TaskLoss subclass stands in for one."""
    import mleps.metrics_config
    from test_task_losses import CorpusOnly

    monkeypatch.setattr(mleps.metrics_config, "build_task_loss", lambda *a, **k: CorpusOnly())
    code, _, err = run_main("mleps.train", "trainer=pg", "trainer.warm_start_steps=2", *SMALL,
                            f"data_dir={data_dir}", f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, "trainer=pg needs a per-output", "trainer=mgs")


def test_evaluate_adopts_the_checkpoint_data_and_metric_unless_overridden():
    from mleps.evaluate import adopt_checkpoint_config

    meta = {"data_config": dict(compose_cfg("data=aeslc", config_name="evaluate").data, max_eval_examples=500),
            "metric_config": {"name": "rouge", "level": "sentence", "rouge_key": "rouge2"},
            "eval_metrics": ["bleu", "repetition"]}
    cfg = compose_cfg("checkpoint=x", config_name="evaluate")
    adopt_checkpoint_config(cfg, meta, ["checkpoint=x"])
    assert cfg.data.name == "aeslc" and cfg.data.max_eval_examples is None  # evaluation size stays evaluate's
    assert cfg.metric.name == "rouge" and cfg.metric.rouge_key == "rouge2"
    assert list(cfg.eval.metrics) == ["bleu", "repetition"]
    overrides = ["checkpoint=x", "data=multi30k_de_en", "metric.rouge_key=rouge1", "eval.metrics=[chrf]"]
    cfg = compose_cfg(*overrides, config_name="evaluate")
    adopt_checkpoint_config(cfg, meta, overrides)
    assert cfg.data.name == "multi30k_de_en"  # named on the command line: kept
    assert cfg.metric.name == "rouge" and cfg.metric.rouge_key == "rouge1"  # adopted, then the override on top
    assert list(cfg.eval.metrics) == ["chrf"]

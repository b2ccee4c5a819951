"""The Python API (mleps.api.Trainer): the CLI's loop with Python objects; task losses as names, TaskLoss
objects or plain callables (which may take the batch's extra dataset columns); a loss registered here."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset

from conftest import TINY_MODEL
from mleps import Trainer, build_task_loss, register_task_loss
from mleps.errors import UserError
from mleps.task_loss import TaskLoss

TINY_MGS = [*TINY_MODEL, "progress=false", "cpu=true", "trainer.warm_start_steps=2", "trainer.max_steps=2",
            "trainer.batch_size=4", "trainer.num_samples=2", "trainer.max_new_tokens=6", "trainer.eval_every=100",
            "trainer.warm_start_eval_every=100", "decode.max_new_tokens=6", "data.max_eval_examples=4"]


@register_task_loss
class WordCount(TaskLoss):
    """A loss registered from a test module: longer outputs cost more (a sentence form, so pg can use it)."""

    name = "test_word_count"

    def sentence_losses(self, decoded):
        return [len(text.split()) / 10 for text in decoded.texts]


def pairs(multi30k_rows, n: int, offset: int = 0) -> Dataset:
    rows = multi30k_rows[offset:offset + n]
    return Dataset.from_list([{"source": r["de"], "target": r["en"], "topic": f"topic-{i % 3}"}
                              for i, r in enumerate(rows)])


def test_a_lambda_task_loss_trains_tiny_marian_and_sees_the_dataset_columns(tmp_path, multi30k_rows):
    seen = []

    def topic_loss(completions, topic):  # names a dataset column: the Trainer passes it, one value per output
        seen.append((len(completions), list(topic)))
        return [float(t[-1] == "0") + len(c) / 100 for c, t in zip(completions, topic)]

    trainer = Trainer("tiny_marian", train_dataset=pairs(multi30k_rows, 16), eval_dataset=pairs(multi30k_rows, 4, 16),
                      task_loss=topic_loss, rule="mgs", config=TINY_MGS, output_dir=tmp_path / "run")
    summary = trainer.train()
    assert [p["trainer"] for p in summary["phases"]] == ["mle", "mgs"]
    assert all(p["steps"] == 2 for p in summary["phases"])
    assert seen and all(n == len(topics) and set(topics) <= {"topic-0", "topic-1", "topic-2"} for n, topics in seen)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("metric") == "topic_loss" and e["split"] == "validation" for e in events), "scored at validation too"
    assert trainer.model is not None and (tmp_path / "run" / "summary.json").is_file()


def test_a_lambda_task_loss_trains_tiny_gpt2_on_completion_files(tmp_path, data_dir):
    calls = []
    trainer = Trainer("tiny_gpt2", rule="pg", output_dir=tmp_path / "run",
                      task_loss=lambda completions, **columns: calls.append(columns) or
                      [len(set(c.split())) / max(len(c.split()), 1) for c in completions],
                      config=[f"data_dir={data_dir}", "data=completion", "data.max_train_examples=16",
                              "trainer.warm_start_steps=0", "trainer.max_steps=2", "trainer.batch_size=4",
                              "trainer.num_samples=2", "trainer.max_new_tokens=6", "trainer.eval_every=100",
                              "decode.max_new_tokens=6", "data.max_eval_examples=4", "model.max_positions=128",
                              *TINY_MODEL, "progress=false", "cpu=true"])
    summary = trainer.train()
    assert summary["phases"][-1]["trainer"] == "pg" and summary["phases"][-1]["steps"] == 2
    assert calls and set(calls[0]) == {"references", "sources"}, "**kwargs receives everything the batch has"


def test_a_registered_loss_by_name_and_a_list_of_losses(tmp_path, multi30k_rows):
    assert build_task_loss("test_word_count").name == "test_word_count"
    trainer = Trainer("tiny_marian", train_dataset=pairs(multi30k_rows, 16), eval_dataset=pairs(multi30k_rows, 4, 16),
                      task_loss="test_word_count", rule="pg", output_dir=tmp_path / "named",
                      config=[*TINY_MGS, "trainer.warm_start_steps=0"])
    assert trainer.config.metric.name == "test_word_count"
    assert trainer.train()["phases"][-1]["steps"] == 2
    mixed = Trainer("tiny_marian", train_dataset=pairs(multi30k_rows, 16), task_loss=["bleu", WordCount()],
                    task_loss_weights=[1.0, 0.5], config=TINY_MGS, output_dir=tmp_path / "mixed")
    loss = mixed.inputs["task_loss"]
    assert [c.name for c in loss.components] == ["bleu", "test_word_count"] and loss.weights == [1.0, 0.5]


def test_the_config_is_typed_and_closed_as_on_the_command_line(tmp_path):
    with pytest.raises(UserError, match="trainer.lr"):
        Trainer(config=["trainer.lr=abc"], output_dir=tmp_path)
    with pytest.raises(UserError, match="lrr"):
        Trainer(config={"trainer.lrr": 0.1}, output_dir=tmp_path)
    with pytest.raises(UserError, match="tokenizer"):
        Trainer(model=object(), output_dir=tmp_path)


@pytest.mark.parametrize("asked", [False, True])
def test_a_model_object_is_not_retrained_with_mle_first_unless_asked(tmp_path, asked):
    """trainer=mgs's default MLE warm start is for runs from scratch: a model handed over as an object is
    fine-tuned as it is (as init_from=CKPT is on the command line), unless trainer.warm_start_steps is set."""
    from omegaconf import OmegaConf

    from conftest import WORDS, word_tokenizer
    from mleps.models import tiny_marian

    tokenizer = word_tokenizer()
    model = tiny_marian(OmegaConf.create({"d_model": 16, "layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0}),
                        tokenizer)
    rows = [{"source": " ".join(WORDS[i:i + 4]), "target": " ".join(WORDS[i:i + 4][::-1])} for i in range(8)]
    config = ["progress=false", "cpu=true", "trainer.max_steps=1", "trainer.batch_size=4", "trainer.num_samples=2",
              "trainer.max_new_tokens=6", "trainer.eval_every=100", "decode.max_new_tokens=6"]
    config += ["trainer.warm_start_steps=1", "trainer.warm_start_eval_every=100"] if asked else []
    trainer = Trainer(model, tokenizer, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]),
                      rule="mgs", config=config, output_dir=tmp_path / "run")
    assert trainer.config.trainer.warm_start_steps == (1 if asked else 800)  # mgs.yaml's default, before train()
    summary = trainer.train()
    assert [(p["phase"], p["steps"]) for p in summary["phases"]] == ([("warm_start", 1)] if asked else []) + [("main", 1)]

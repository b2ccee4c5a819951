"""The Python API: the training loop `python -m mleps.train` runs, from a notebook or a script.

    from datasets import Dataset
    from mleps import Trainer

    train = Dataset.from_list([{"source": "ein Hund läuft", "target": "a dog runs", "topic": "animals"}, ...])
    trainer = Trainer(model="tiny_marian", train_dataset=train, eval_dataset=validation,
                      task_loss=lambda completions, topic: [float(t not in c) for c, t in zip(completions, topic)],
                      rule="mgs", config=["trainer.warm_start_steps=200", "trainer.max_steps=40"],
                      output_dir="runs/notebook")
    summary = trainer.train()          # the CLI's summary: each phase's start and end score
    trainer.model                      # the trained model (checkpoints/{best,last} are in output_dir)

Everything is a config value first: `config` holds the CLI's overrides (a list of "key=value", or a
dict), composed with mleps/conf/train.yaml by Hydra exactly as on the command line, so a wrong type fails
at once naming the key and an unknown key is refused at the start of `train()`. The arguments are
shortcuts for the usual ones (`model="t5-small"` is model=hf model.name_or_path=t5-small, a file
path for a dataset is data.train_file=PATH) or Python objects the config cannot hold:

  model          tiny_marian | tiny_gpt2 | a hub name or folder | a transformers model (with `tokenizer`)
  train_dataset  a file path, or an HF Dataset in the data config's columns (data.source_column /
  eval_dataset   target_column; "source"/"target" columns are picked up); its other columns reach the
                 task losses, one value per output (DecodedBatch.columns), for pairs tasks
  task_loss      a registered name ("bleu", or one your code registered with @register_task_loss), a
                 TaskLoss, a function, or a list of them (summed with `task_loss_weights`). A function
                 is called with the keyword arguments it names among completions, references, sources
                 and the batch's extra columns (**kwargs: all), and returns one loss per output, lower
                 is better (mleps.losses.CallableLoss)
  rule           mle | mgs | pg | mrt (trainer=...). A model object is fine-tuned as it is: the rule's MLE
                 warm start (trainer=mgs's default) runs only if `config` sets trainer.warm_start_steps
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from mleps.errors import UserError
from mleps.task_loss import TaskLoss

BUILT_IN_MODELS = ("tiny_marian", "tiny_gpt2", "smollm2")  # model=<name> options; any other name is model=hf


def compose_config(overrides: Sequence[str] | dict = ()) -> DictConfig:
    """mleps/conf/train.yaml with the CLI's overrides, composed and type-checked by Hydra as the command line is."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import mleps.train  # noqa: F401  (the run_dir resolver mleps/conf/train.yaml names)
    from mleps.config import conf_dir, register_configs

    register_configs()
    config_dir = conf_dir("train")
    if GlobalHydra.instance().is_initialized():  # e.g. inside a Hydra app of the caller's
        GlobalHydra.instance().clear()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mleps.errors import hydra_message

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="train", overrides=as_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as e:  # the CLI's one line: the key, and what is wrong
        raise UserError(hydra_message(e)) from None


def as_overrides(config: Sequence[str] | dict | None) -> list[str]:
    if config is None:
        return []
    if isinstance(config, dict):
        return [f"{k}={_value(v)}" for k, v in config.items()]
    if isinstance(config, str):
        raise TypeError("config: pass a list of overrides, e.g. ['trainer.max_steps=10'], or a dict")
    return list(config)


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


class Trainer:
    def __init__(self, model: Any = None, tokenizer=None, *, train_dataset=None, eval_dataset=None,
                 task_loss: str | TaskLoss | Callable | Sequence | None = None,
                 task_loss_weights: Sequence[float] | None = None, rule: str | None = None,
                 config: Sequence[str] | dict | None = None, output_dir: str | Path | None = None, callbacks=()):
        shortcuts: list[str] = []
        self.inputs: dict = {}
        if rule is not None:
            shortcuts.append(f"trainer={rule}")
        shortcuts += self._model(model, tokenizer)
        shortcuts += self._datasets(train_dataset, eval_dataset)
        if isinstance(task_loss, str):
            shortcuts += [_metric_override(task_loss)]
        output_dir = Path(output_dir or Path("runs") / "api" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        shortcuts.append(f"output_dir={output_dir.absolute()}")
        from mleps.train import override_keys

        self.asked = override_keys(as_overrides(config))  # what the caller set (not the shortcuts): see train.run
        self.config = compose_config(shortcuts + as_overrides(config))  # the caller's overrides come last
        self.run_dir = Path(self.config.output_dir)
        if task_loss is not None and not isinstance(task_loss, str):
            self.inputs["task_loss"] = self._task_loss(task_loss, task_loss_weights)
        self.callbacks = list(callbacks)
        self.model = None  # the trained model, after train()
        self.tokenizer = tokenizer

    def _model(self, model, tokenizer) -> list[str]:
        if model is None:
            return []
        if isinstance(model, (str, Path)):
            name = str(model)
            return [f"model={name}"] if name in BUILT_IN_MODELS else ["model=hf", f"model.name_or_path={name}"]
        if tokenizer is None:
            raise UserError("a model object needs its tokenizer: Trainer(model, tokenizer, ...)")
        self.inputs.update(model=model, tokenizer=tokenizer)
        from mleps.families import family_for

        kind = family_for(model).name  # what validation checks options against
        return ["model=hf", f"model.kind={kind}", f"model.name_or_path={getattr(model, 'name_or_path', '') or kind}"]

    def _datasets(self, train, validation) -> list[str]:
        overrides, given = [], {}
        for split, ds in (("train", train), ("validation", validation)):
            if ds is None:
                continue
            if isinstance(ds, (str, Path)):
                overrides.append(f"data.{split}_file={Path(ds).absolute()}")
            else:
                given[split] = ds
                overrides.append(f"data.{split}_file=null")  # the rows come from Python, not a file
        if train is not None and validation is None:  # no one else's validation set
            overrides.append("data.validation_file=null")
        if given:
            self.inputs["datasets"] = given
            first = next(iter(given.values()))
            if {"source", "target"} <= set(first.column_names):
                overrides[:0] = ["data.source_column=source", "data.target_column=target"]
            overrides.insert(0, "data.name=dataset")
        return overrides

    def _task_loss(self, task_loss, weights) -> TaskLoss:
        from mleps.losses import CallableLoss, Composite
        from mleps.metrics_config import metric_from_config

        level = self.config.metric.level

        def one(x) -> TaskLoss:
            if isinstance(x, TaskLoss):
                return x
            if isinstance(x, str):
                return metric_from_config(self.config.metric, name=x)
            return CallableLoss(x, level=level)

        if isinstance(task_loss, (list, tuple)):
            weights = list(weights) if weights is not None else [1.0] * len(task_loss)
            if len(weights) != len(task_loss):
                raise UserError(f"task_loss_weights: {len(weights)} weights for {len(task_loss)} task losses")
            return Composite([one(x) for x in task_loss], [float(w) for w in weights], level)
        return one(task_loss)

    def train(self) -> dict:
        """Train as `python -m mleps.train` would with this config; returns its summary."""
        from mleps.models import load_checkpoint
        from mleps.train import run

        summary = run(self.config, self.run_dir, self.callbacks, asked=self.asked, **self.inputs)
        best = self.run_dir / "checkpoints" / ("best" if (self.run_dir / "checkpoints" / "best").is_dir() else "last")
        self.model, self.tokenizer, _ = load_checkpoint(str(best))
        return summary


def _metric_override(name: str) -> str:
    """metric=<name> for a registered loss (its yaml's values, or its node's defaults: one registered by the
    caller's code after import has its own node too), else metric.name=<name> (build_task_loss says what is wrong)."""
    from mleps.task_loss import TASK_LOSSES

    return f"metric={name}" if name in TASK_LOSSES else f"metric.name={name}"

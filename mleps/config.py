"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The YAML files under mleps/conf/ hold the values; these dataclasses hold the types, so a
wrong type (`trainer.lr=abc`) fails at start with Hydra's message naming the key.
Each update rule's schema (a `TrainerConfig` subclass with the knobs it reads) lives in its own
module under mleps/trainers and is registered from the rules' table.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import mleps.losses  # noqa: F401  (registers the built-in task losses, each with its config node)
from mleps.errors import UserError
from mleps.task_loss import TASK_LOSSES, Level, option_fields

# Each update rule owns its schema beside its step (mleps/trainers); re-exported here with the others.
from mleps.trainers import RULES
from mleps.trainers.base import TrainerConfig
from mleps.trainers.mgs import MGSConfig
from mleps.trainers.mle import MLEConfig
from mleps.trainers.mrt import MRTConfig
from mleps.trainers.pg import PGConfig
from mleps.trainers.sequences import SequenceSamplingConfig

# The YAML files ship inside the package (package data in pyproject.toml): found beside the installed
# module, so a wheel installed anywhere runs from any working directory.
CONF_DIR = Path(str(importlib.resources.files("mleps") / "conf"))

__all__ = ["CONF_DIR", "conf_dir", "DataConfig", "ModelConfig", "MetricBase", "metric_schema", "EvalConfig", "DecodeConfig", "TrainConfig", "EvaluateConfig",
           "TrainerConfig", "MLEConfig", "MGSConfig", "SequenceSamplingConfig", "PGConfig", "MRTConfig",
           "register_configs"]


@dataclass
class DataConfig:
    name: str = MISSING
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # A dataset by name instead of files (data=hf): a hub name for datasets.load_dataset, or a folder written
    # by Dataset/DatasetDict.save_to_disk; when set, the *_file keys are not read
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None  # load_dataset's configuration name, e.g. de-en for wmt16
    # the dataset's split for each of mleps's splits; a slice such as train[:10000] reads only those rows;
    # null: no such split (no validation: no evaluations)
    train_split: Optional[str] = "train"
    validation_split: Optional[str] = "validation"
    test_split: Optional[str] = "test"
    # a dotted name is a field of a struct column: translation.de (WMT's layout, as Dataset.flatten names it)
    source_column: str = MISSING
    target_column: str = MISSING
    reference_columns: List[str] = field(default_factory=list)  # extra references (eval only)
    max_train_examples: Optional[int] = None  # null = all
    max_eval_examples: Optional[int] = None
    max_source_length: int = 128  # tokens; longer examples are truncated and counted
    max_target_length: int = 128
    task: str = "pairs"  # pairs: source -> target | completion: continue each document's prefix (docs/completion.md)
    text_column: Optional[str] = None  # completion: the documents' column (a .txt file: one document per line)
    prefix_tokens: int = 10  # completion: prompt length in tokens; shorter documents are skipped and counted
    continuation_tokens: int = 50  # completion: reference continuation, at most this many tokens (+ EOS)
    # completion: keep only documents that end within prefix + continuation tokens, so every reference
    # ends with EOS and not stopping is purely a defect (the others are skipped and counted)
    whole_documents: bool = False
    loss_on: Optional[str] = None  # decoder-only MLE: all (null: prompt and continuation) | continuation
    # completion: windows (a prefix and continuation_tokens more) | paragraphs (each non-empty line of a
    # document is one sequence) | documents (each document whole); the last two end every reference with EOS
    sequences: str = "windows"
    min_sequence_tokens: int = 10  # paragraphs/documents: drop sequences of at most this many tokens (counted)
    max_sequence_tokens: Optional[int] = None  # paragraphs/documents: drop longer sequences (counted); null = keep


@dataclass
class ModelConfig:
    name: str = MISSING  # tiny_marian | tiny_gpt2 | smollm2 | hf
    name_or_path: Optional[str] = None  # hf: hub name or local folder; smollm2: its prepared folder
    gguf_file: Optional[str] = None  # hf: a GGUF file in that folder (or a path), dequantised (mleps.pretrained)
    kind: str = "auto"  # hf: auto (from the checkpoint's config) | causal | seq2seq
    source_prefix: str = ""  # T5-style task prompt, e.g. "translate German to English: "
    trust_remote_code: bool = False
    # tiny_marian / tiny_gpt2: a MarianMTModel / GPT2LMHeadModel built from this config and a BPE
    # tokenizer trained on the data
    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    max_positions: int = 512  # tiny_gpt2: n_positions (prompt + output tokens)
    # Any model (mleps.models.prepare_model, docs/models.md):
    peft: str = "none"  # none: train every weight | lora: train a LoRA adapter only (the peft library)
    lora_r: int = 8  # the adapter's rank
    lora_alpha: float = 16.0  # its scale is lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # modules to adapt, matched on the end of their names, e.g. [q_proj,v_proj]; empty: the
    # architecture's default (peft's table; Marian: q_proj, v_proj; GPT-2: c_attn)
    lora_target_modules: List[str] = field(default_factory=list)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time


@dataclass
class MetricBase:
    """The task loss (docs/metrics.md): what MGS/PG/MRT minimise and validation selects on. `metric=<name>`
    picks one; its node is this plus the loss's own options (metric_schema)."""

    name: str = "bleu"  # a registered task loss (mleps.losses): bleu | chrf | rouge | repetition | seq_rep | ...
    level: Level = Level.corpus  # corpus: one loss pooled over the batch; sentence: mean of sentence losses


def metric_schema(name: str) -> type:
    """The config node of task loss `name`: MetricBase plus its options (their help is beside each loss, e.g.
    mleps.losses.lm.LMOptions), `<name>_metric_schema` in the ConfigStore. Built when asked, so a loss
    registered after import (a user's package) has its own keys."""
    return _metric_schema(name, TASK_LOSSES[name], tuple(TASK_LOSSES.values()))


def checkpoint_metric_schema() -> type:
    """mleps.evaluate's default node (`metric: from_checkpoint`): the checkpoint's own task loss, adopted from
    its saved config (bleu for a folder that names none), so it takes every loss's options as metric.* keys."""
    return _metric_schema("bleu", None, tuple(TASK_LOSSES.values()))


@functools.lru_cache(maxsize=None)
def _metric_schema(name: str, loss: type, registered: tuple) -> type:  # one class per loss and registry state
    if loss is None:  # every loss's options (checkpoint_metric_schema)
        return dataclasses.make_dataclass("CheckpointMetricConfig", option_fields(), bases=(MetricBase,))
    return dataclasses.make_dataclass("".join(w.title() for w in name.split("_")) + "MetricConfig",
                                      [("name", str, field(default=name))], bases=(loss.config_options(), MetricBase))


@dataclass
class EvalConfig:
    metrics: List[str] = field(default_factory=list)  # secondary validation metrics, e.g. [bleu,chrf,repetition]
    # what checkpoints/best and trainer.patience follow: the metric's score, or the references'
    # cross_entropy (lower is better; the MLE optimum, e.g. for a completion base model)
    select: str = "score"


@dataclass
class DecodeConfig:
    num_beams: int = 1
    max_new_tokens: int = 64
    batch_size: int = 128
    length_penalty: float = 1.0


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    metric: MetricBase = field(default_factory=MetricBase)  # metric=<name> brings that loss's own node
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    seed: int = 0
    data_dir: str = "data"
    output_dir: Optional[str] = None  # null: Hydra's run dir
    init_from: Optional[str] = None  # start from a saved checkpoint folder
    resume: Any = False  # true, or a run dir to continue
    overwrite: bool = False
    # experiment trackers through accelerate, beside metrics.jsonl (always written): tensorboard, wandb,
    # mlflow, comet_ml, aim, clearml, dvclive, ... (accelerate's names); local files in <run dir>/trackers
    trackers: List[str] = field(default_factory=list)
    tracker_project: str = "mleps"  # wandb/comet project, mlflow experiment; TensorBoard: trackers/<this>/
    tensorboard: bool = False  # the older spelling of trackers=[tensorboard]
    progress: bool = True
    cache_dir: Optional[str] = None  # tokenizer/model cache; null: $MLEPS_CACHE_DIR or ~/.cache/mleps
    mixed_precision: str = "no"  # no | bf16 | fp16 (through accelerate; weights stay fp32)
    cpu: bool = False
    collective_timeout_s: float = 600.0  # a rank waiting this long in a collective fails instead of hanging


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    data: DataConfig = MISSING
    metric: MetricBase = field(default_factory=MetricBase)  # metric=<name> brings that loss's own node
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    split: str = "test"
    data_dir: str = "data"
    predictions: Optional[str] = None  # default: <checkpoint>/predictions-<data>-<split>-<file stem>-<hash>.txt
    source_prefix: Optional[str] = None  # null: the checkpoint's own (saved at training time)
    per_example: bool = False  # also write <predictions stem>.per_example.jsonl: each output's tokens, EOS, losses
    seed: int = 0
    progress: bool = True


def register_configs(trainer_schemas: dict[str, type] | None = None) -> None:
    """Every schema into Hydra's ConfigStore. trainer_schemas: {rule name: a subclass of its schema}, for a
    caller that adds keys to a rule's options (mleps_lab's probes add trainer.diagnose_every to mgs's)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    for name in TASK_LOSSES:  # every registered task loss's own node; one without a yaml file is its own option
        cs.store(group="metric", name=f"{name}_metric_schema", node=metric_schema(name))
        if not (CONF_DIR / "metric" / f"{name}.yaml").is_file():
            cs.store(group="metric", name=name, node=metric_schema(name))
    cs.store(group="metric", name="from_checkpoint", node=checkpoint_metric_schema())
    for name, rule in RULES.items():  # every registered rule's own schema
        schema = (trainer_schemas or {}).get(name, rule.schema)
        if not issubclass(schema, rule.schema):  # an extension keeps every key the rule reads
            raise TypeError(f"trainer_schemas[{name!r}]: {schema.__name__} does not extend {rule.schema.__name__}")
        cs.store(group="trainer", name=f"{name}_schema", node=schema)


def conf_dir(config_name: str) -> Path:
    """CONF_DIR, after checking that it holds <config_name>.yaml: a package installed without its configs
    (a wheel built without package data, a file deleted) fails with one line instead of Hydra's search-path report."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise UserError(f"{CONF_DIR / config_name}.yaml is missing from the installed mleps package: reinstall it "
                        f"(pip install --force-reinstall mleps, or `make install` in a checkout)")
    return CONF_DIR

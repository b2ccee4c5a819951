"""Every value of a training config checked at once, before anything is written or trained.

Hydra's schemas check types; this checks ranges and choices: numbers that must be positive,
option names, and each phase's update-rule options (the rule's own `check_config`), so a typo
in the main phase's options fails at start instead of after the warm start. Data files, the
model and the metric are loaded (and so checked) by Loop.setup before it touches the run dir.
"""
from __future__ import annotations

import dataclasses
import math

from omegaconf import OmegaConf

from mleps.data import LOSS_ON, SEQUENCES, TASKS
from mleps import adapters
from mleps.errors import UserError
from mleps.families import family_named
from mleps.checks import _at_least, _finite
from mleps.models import model_source
from mleps.schedules import SCHEDULES
from mleps.task_loss import LEVELS
from mleps.trainers import rule_class

MIXED_PRECISION = ("no", "bf16")


WARM_START_KEYS = {"max_steps": "warm_start_steps", "lr": "warm_start_lr", "eval_every": "warm_start_eval_every",
                   "schedule": "warm_start_schedule", "warmup_steps": "warm_start_warmup_steps",
                   "label_smoothing": "warm_start_label_smoothing"}  # the warm start's settings (mleps.loop.make_phases)


def check_trainer(tcfg, warm_start: bool = False) -> None:
    """One phase's trainer section (the main trainer, or the warm start's MLE settings)."""
    def key_of(k: str) -> str:  # the key the user sets
        return f"trainer.{WARM_START_KEYS.get(k, k) if warm_start else k}"

    for key in ("batch_size", "gradient_accumulation_steps", "eval_every", "log_every", "save_every",
                "max_bad_steps"):
        _at_least(tcfg[key], 1, key_of(key))
    for key in ("max_steps", "warmup_steps", "warm_start_steps"):
        _at_least(tcfg[key], 0, key_of(key))
    _at_least(tcfg.patience, 1, key_of("patience"))
    _finite(tcfg.lr, key_of("lr"), 0.0)
    _finite(tcfg.weight_decay, key_of("weight_decay"), 0.0)
    _finite(tcfg.max_grad_norm, key_of("max_grad_norm"), 0.0)
    if not 0 <= tcfg.label_smoothing < 1:
        raise UserError(f"{key_of('label_smoothing')}={tcfg.label_smoothing}: use a number in [0, 1)")
    if len(tcfg.betas) != 2 or not all(0 <= b < 1 for b in tcfg.betas):
        raise UserError(f"{key_of('betas')}={list(tcfg.betas)}: use two numbers in [0, 1), e.g. [0.9, 0.98]")
    _at_least(tcfg.get("batch_tokens"), 1, key_of("batch_tokens"))
    ratio = tcfg.get("max_length_ratio")
    if ratio is not None:
        _finite(ratio, key_of("max_length_ratio"), 0.0, strict=True)
    if tcfg.max_train_s is not None:
        _finite(tcfg.max_train_s, key_of("max_train_s"), 0.0, strict=True)
    if tcfg.schedule not in SCHEDULES:
        raise UserError(f"unknown {key_of('schedule')} '{tcfg.schedule}': use one of {', '.join(SCHEDULES)}")
    if not warm_start:
        for key, low, strict in RULE_NUMBERS:  # the rules' own numbers, wherever a rule has them
            if tcfg.get(key) is not None:
                _finite(tcfg[key], f"trainer.{key}", low, strict)
    rule_class(tcfg.name).check_config(tcfg)


# (key, lowest value, whether the lowest itself is refused): the update rules' numbers, checked here for every
# rule that has them (their own check_config may say more).
RULE_NUMBERS = (("kl_coef", 0.0, False), ("sharpness", 0.0, True), ("mle_mix", 0.0, False),
                ("sample_temperature", 0.0, True), ("guide_scale", 0.0, False), ("warm_start_lr", 0.0, False),
                ("warm_start_label_smoothing", 0.0, False))


def check_finite(node, prefix: str = "") -> None:
    """Every float of the config is finite: inf and nan pass range checks written as `not x >= 0` or `x > 0`,
    and a non-finite knob skips every step as non-finite instead of failing."""
    for key in node.keys():
        value = node._get_node(key)
        if OmegaConf.is_dict(value):
            check_finite(node[key], f"{prefix}{key}.")
            continue
        items = list(node[key] or []) if OmegaConf.is_list(value) else [node[key]]  # a null list holds nothing
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"{prefix}{key}={node[key]}: use a finite number")


def check_known_keys(cfg, prefix: str = "") -> None:
    """`+trainer.lrr=0.1` adds a key the schema does not have (Hydra allows it): nothing would read it."""
    schema = OmegaConf.get_type(cfg)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        if known is not None and key not in known:
            raise UserError(f"unknown key {prefix}{key}: no such setting (see mleps/config.py); check the spelling")
        if OmegaConf.is_dict(cfg._get_node(key)):
            check_known_keys(cfg[key], f"{prefix}{key}.")


def validate_train_config(cfg, phases) -> None:
    """Raise UserError naming the first bad value (and the fix)."""
    check_known_keys(cfg)
    check_finite(cfg)
    main = cfg.trainer
    check_trainer(main)
    for phase in phases:
        if phase.name != "main":
            check_trainer(phase.trainer, warm_start=True)
    _at_least(cfg.seed, 0, "seed")
    if cfg.seed >= 2**32:
        raise UserError(f"seed={cfg.seed}: use a number below 2**32")
    d = cfg.decode
    for key in ("num_beams", "max_new_tokens", "batch_size"):
        _at_least(d[key], 1, f"decode.{key}")
    _finite(d.length_penalty, "decode.length_penalty")
    if cfg.eval.select not in ("score", "cross_entropy"):
        raise UserError(f"eval.select={cfg.eval.select}: use score (the metric) or cross_entropy (of the references)")
    data = cfg.data
    for key in ("max_train_examples", "max_eval_examples"):
        _at_least(data[key], 1, f"data.{key}")
    for key in ("max_source_length", "max_target_length"):  # room for one token and </s>
        _at_least(data[key], 2, f"data.{key}")
    if cfg.metric.get("level") not in LEVELS:
        raise UserError(f"unknown metric.level '{cfg.metric.level}': use one of {', '.join(LEVELS)}")
    _check_task(data, cfg.model, cfg.init_from)
    if cfg.init_from:
        check_tokenizer_files(cfg.init_from, "init_from")
    built = cfg.model.name in ("tiny_marian", "tiny_gpt2") and not cfg.init_from  # model.d_model is their width
    if built and cfg.model.get("peft") == "lora" and cfg.model.lora_r > cfg.model.d_model:
        raise UserError(f"model.lora_r={cfg.model.lora_r} is larger than the layers it adapts (model.d_model="
                        f"{cfg.model.d_model}): a rank above the width adds nothing; use at most {cfg.model.d_model}")
    model_source(cfg.model.name).check(cfg)  # the model=<name> option's own sizes and names
    adapters.check_config(cfg.model)  # model.peft, model.lora_*
    if cfg.mixed_precision == "fp16":
        # fp16 needs a loss scaler around every rule's backward (MGS writes .grad itself) and in
        # the checkpoint; bf16 needs neither.
        raise UserError("mixed_precision=fp16 is not supported (its loss scaler is neither applied by every "
                        "update rule nor checkpointed): use mixed_precision=bf16 or no")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise UserError(f"unknown mixed_precision '{cfg.mixed_precision}': use one of {', '.join(MIXED_PRECISION)}")
    _finite(cfg.collective_timeout_s, "collective_timeout_s", 0.0, strict=True)
    check_trackers(tracker_names(cfg))


# A folder holding none of these has no tokenizer (transformers would then fail naming the model's config class).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "source.spm", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


def check_tokenizer_files(path: str, key: str) -> None:
    """A local checkpoint folder (init_from=, evaluate's checkpoint=) has its tokenizer's files."""
    from mleps.data import data_path

    folder = data_path(path)
    # only a folder with complete model files: without them the loader's message (no model files) is the one to give
    weights = folder.is_dir() and (folder / "config.json").is_file() and (
        any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file())
    if weights and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{key}={path}: {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:2])}, "
                        f"...): copy them from the run or model the weights came from, or name a complete checkpoint")


def tracker_names(cfg) -> list[str]:
    """trackers=[...], with tensorboard=true (the older spelling) as tensorboard; each once."""
    return list(dict.fromkeys([*cfg.trackers, *(["tensorboard"] if cfg.tensorboard else [])]))


def check_trackers(names: list[str]) -> None:
    """accelerate's tracker names, each with its package installed (accelerate itself would drop a missing
    one with a debug message, and the run would log to nothing)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"unknown tracker '{name}' in trackers: use accelerate's "
                            f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or trackers=[] (metrics.jsonl only)")
        if name in LoggerType.list() and name not in available:  # a built-in one (not a registered class)
            raise UserError(f"trackers: {name} is not installed: pip install {name}, or drop it from trackers")


def model_family(model_cfg, init_from: str | None = None) -> str | None:
    """causal | seq2seq as far as the config tells without loading weights (None: read at load time)."""
    if init_from:
        return None
    family = model_source(model_cfg.name).family
    if family is not None:
        return family
    return model_cfg.kind if model_cfg.get("kind", "auto") != "auto" else None


def _check_task(data, model_cfg, init_from: str | None = None) -> None:
    """data.task / completion lengths / options that only one model family supports."""
    if data.task not in TASKS:
        raise UserError(f"data.task={data.task} is not one of: {', '.join(TASKS)}")
    if data.loss_on is not None and data.loss_on not in LOSS_ON:
        raise UserError(f"data.loss_on={data.loss_on} is not one of: {', '.join(LOSS_ON)}")
    # The completion options are checked whatever the task: a bad value waits in a config to be used.
    _at_least(data.prefix_tokens, 1, "data.prefix_tokens")
    _at_least(data.continuation_tokens, 1, "data.continuation_tokens")
    if data.sequences not in SEQUENCES:
        raise UserError(f"data.sequences={data.sequences} is not one of: {', '.join(SEQUENCES)}")
    if data.task == "completion":
        if not data.text_column:
            raise UserError("data.task=completion needs data.text_column=COLUMN (the documents' text column)")
        if data.prefix_tokens < 1:
            raise UserError(f"data.prefix_tokens={data.prefix_tokens}: use 1 or more")
        if data.continuation_tokens < 1:
            raise UserError(f"data.continuation_tokens={data.continuation_tokens}: use 1 or more")
        if data.sequences not in SEQUENCES:
            raise UserError(f"data.sequences={data.sequences} is not one of: {', '.join(SEQUENCES)}")
        _at_least(data.min_sequence_tokens, 0, "data.min_sequence_tokens")
        if data.max_sequence_tokens is not None and data.max_sequence_tokens <= data.prefix_tokens:
            raise UserError(f"data.max_sequence_tokens={data.max_sequence_tokens} leaves nothing after the "
                            f"{data.prefix_tokens}-token prefix: raise it above data.prefix_tokens (or null)")
        if data.prefix_tokens > data.max_source_length:
            raise UserError(f"data.prefix_tokens={data.prefix_tokens} is longer than data.max_source_length="
                            f"{data.max_source_length} (the prompt limit): raise data.max_source_length")
    check_family_options(data, model_family(model_cfg, init_from))


def check_family_options(data, family: str | None) -> None:
    """The data options the model's family refuses (family None: not known yet, nothing to check)."""
    if family is not None:
        family_named(family).check_options(data)

"""Models and tokenizers: the embedded tiny Marian and tiny GPT-2, any hub/local model, saved checkpoints.

tiny_marian and tiny_gpt2 train a byte-level BPE tokenizer on the training split (its source
and target texts; a completion task's documents) with `tokenizers`, cached under
<cache_dir>/tokenizers/<data fingerprint>, so it is trained once per dataset, vocabulary size
and recipe, then build a MarianMTModel / GPT2LMHeadModel from a small config. model=hf loads an
encoder-decoder (AutoModelForSeq2SeqLM) or a decoder-only model (AutoModelForCausalLM): the
checkpoint's config says which (`is_encoder_decoder`), or `model.kind=seq2seq|causal`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig,
    GPT2Config,
    GPT2LMHeadModel,
    AutoTokenizer,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from mleps.checks import _at_least, _divisor
from mleps.data import data_path
from mleps import pretrained
from mleps.errors import UserError
from mleps.families import CAUSAL, SEQ2SEQ, family_for, family_for_config, family_named

log = logging.getLogger(__name__)
# save_pretrained/from_pretrained draw progress bars for a 25 MB model; the loop has its own.
hf_logging.disable_progress_bar()

TOKENIZER_RECIPE = "bytelevel-bpe-v1"  # bump when the training recipe changes: invalidates caches
# tiny_gpt2's: no prefix space and no </s> appended (a prompt must not end with EOS; the completion
# builder appends it where a document ends)
CAUSAL_TOKENIZER_RECIPE = "bytelevel-bpe-causal-v1"
MLEPS_META = "mleps.json"  # beside a checkpoint's weights: source prefix and provenance


def cache_dir(cfg_cache_dir: str | None = None) -> Path:
    root = cfg_cache_dir or os.environ.get("MLEPS_CACHE_DIR") or Path.home() / ".cache" / "mleps"
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    """One `model=<name>` option: what builds (model, tokenizer) from the config (and the training split,
    for a tokenizer trained on it), its model family when the option fixes it, and its start-up check."""

    name: str
    build: Callable  # (cfg, train_ds) -> (model, tokenizer)
    family: str | None = None  # seq2seq | causal; None: read from the checkpoint (model.kind)
    check: Callable = lambda cfg: None  # (cfg) -> None, raises UserError naming the key


MODEL_SOURCES: dict[str, ModelSource] = {}


def register_model(name: str, family: str | None = None, check: Callable | None = None):
    """Decorator on a build function `(cfg, train_ds) -> (model, tokenizer)`: makes it `model=<name>`."""
    def register(build):
        MODEL_SOURCES[name] = ModelSource(name, build, family, check or (lambda cfg: None))
        return build
    return register


def model_source(name: str) -> ModelSource:
    if name not in MODEL_SOURCES:
        raise UserError(f"unknown model '{name}': use model=tiny_marian, model=tiny_gpt2, model=smollm2 or "
                        f"model=hf model.name_or_path=NAME")
    return MODEL_SOURCES[name]


def load_model_and_tokenizer(cfg, train_ds=None):
    """(model, tokenizer, source_prefix) for cfg.model, or for cfg.init_from when set."""
    if cfg.init_from:
        model, tokenizer, meta = load_checkpoint(cfg.init_from, trust_remote_code=cfg.model.trust_remote_code)
        prefix = meta.get("source_prefix", cfg.model.source_prefix)
        return model, tokenizer, prefix
    return (*model_source(cfg.model.name).build(cfg, train_ds), cfg.model.source_prefix)


def prepare_model(model, model_cfg):
    """The one place a model is set up for training as model.peft and model.gradient_checkpointing say,
    however it came (built, init_from, handed over by mleps.api, or a resumed run's checkpoint)."""
    from mleps import adapters
    from mleps.families import family_for

    if model_cfg.get("gradient_checkpointing", False):
        try:  # non-reentrant: frozen inputs (LoRA's frozen embeddings) still get their gradient path
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as e:
            raise UserError(f"model.gradient_checkpointing=true: {str(e).splitlines()[0][:200]}: "
                            f"set model.gradient_checkpointing=false") from None
    method = model_cfg.get("peft", "none")
    if adapters.is_adapted(model):  # a LoRA checkpoint (init_from, or this run's own when resuming)
        if method == "none":
            log.info("model.peft=none: the checkpoint's LoRA adapter is merged into its weights; every weight trains")
            return adapters.merged(model)
        log.info("model.peft=%s: training the checkpoint's own adapter (its rank and targets, not model.lora_*)",
                 method)
        return model
    if method == "lora":
        return adapters.wrap(model, model_cfg, family_for(model).peft_task_type)
    return model


def _check_tiny(cfg) -> None:
    """The tiny models' sizes."""
    m = cfg.model
    for key in ("vocab_size", "d_model", "layers", "heads", "ffn_dim"):
        _at_least(m[key], 1, f"model.{key}")
    if m.d_model % m.heads:
        raise UserError(f"model.heads={m.heads} does not divide model.d_model={m.d_model}: "
                        f"pick heads that divide it (e.g. {_divisor(m.d_model, m.heads)})")
    if not 0 <= m.dropout < 1:
        raise UserError(f"model.dropout={m.dropout}: use a number in [0, 1)")


def _check_tiny_gpt2(cfg) -> None:
    """The tiny sizes, and positions for the longest prompt and output."""
    _check_tiny(cfg)
    m, data, d = cfg.model, cfg.data, cfg.decode
    _at_least(m.max_positions, 2, "model.max_positions")
    if data.task == "completion" and data.get("sequences", "windows") != "windows" and data.max_sequence_tokens is None:
        raise UserError(f"data.sequences={data.sequences} with tiny_gpt2 needs data.max_sequence_tokens (a sequence "
                        f"must fit model.max_positions={m.max_positions}): set e.g. data.max_sequence_tokens=256")
    reference = (data.continuation_tokens + 1 if data.get("sequences", "windows") == "windows" else
                 (data.max_sequence_tokens or 0) - data.prefix_tokens + 1)
    needed = max(data.max_source_length if data.task == "pairs" else data.prefix_tokens, 1) + max(
        d.max_new_tokens, getattr(cfg.trainer, "max_new_tokens", 0) or 0, reference)
    if needed > m.max_positions:
        raise UserError(f"model.max_positions={m.max_positions} is shorter than a prompt and its output "
                        f"({needed} tokens: data.prefix_tokens + the longest of decode.max_new_tokens, "
                        f"trainer.max_new_tokens, data.continuation_tokens + 1): raise model.max_positions")


def _check_hf(cfg) -> None:
    m = cfg.model
    if not m.name_or_path and not cfg.init_from:
        raise UserError("model=hf needs model.name_or_path=NAME_OR_FOLDER (e.g. t5-small)")
    if m.kind != "auto":
        family_named(m.kind)  # a registered family's name
    if m.get("gguf_file") and not cfg.init_from:  # the file, its format and architecture (mleps.pretrained)
        pretrained.check_gguf(m.name_or_path, m.gguf_file)


@register_model("tiny_marian", family=SEQ2SEQ, check=_check_tiny)
def _tiny_marian(cfg, train_ds):
    if train_ds is None:
        raise ValueError("tiny_marian needs the training split to train its tokenizer")
    tokenizer = bpe_tokenizer(cfg.data, train_ds, cfg.model.vocab_size, cache_dir(cfg.cache_dir))
    return tiny_marian(cfg.model, tokenizer), tokenizer


@register_model("tiny_gpt2", family=CAUSAL, check=_check_tiny_gpt2)
def _tiny_gpt2(cfg, train_ds):
    if train_ds is None:
        raise ValueError("tiny_gpt2 needs the training split to train its tokenizer")
    tokenizer = bpe_tokenizer(cfg.data, train_ds, cfg.model.vocab_size, cache_dir(cfg.cache_dir), causal=True)
    return tiny_gpt2(cfg.model, tokenizer), tokenizer


@register_model("hf", check=_check_hf)  # the family comes from the checkpoint's config (or model.kind)
def _hub_model(cfg, train_ds):
    if cfg.model.get("gguf_file"):
        return pretrained.from_gguf(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.kind,
                                    cfg.model.trust_remote_code)
    return from_pretrained(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.kind)


@register_model("smollm2", family=CAUSAL, check=pretrained.check_smollm2)
def _smollm2(cfg, train_ds):  # prepared once from the GGUF on the package index (scripts/prepare_smollm2.py)
    return pretrained.load_smollm2(cfg)


def bpe_tokenizer(data_cfg, train_ds, vocab_size: int, root: Path, causal: bool = False) -> PreTrainedTokenizerFast:
    """A shared source+target byte-level BPE, trained once per (training data, vocab size, recipe).
    causal: GPT-2's habits, no prefix space and no </s> appended to an encoded text."""
    recipe = CAUSAL_TOKENIZER_RECIPE if causal else TOKENIZER_RECIPE
    # a dataset handed over in Python (mleps.api) or named by data.dataset has no file: its fingerprint names
    # its contents
    from_file = data_cfg.train_file and not data_cfg.get("dataset")
    digest = _file_digest(data_path(data_cfg.train_file)) if from_file else f"dataset-{train_ds._fingerprint}"
    parts = [recipe, vocab_size, digest,
             data_cfg.source_column, data_cfg.target_column, data_cfg.max_train_examples]
    if data_cfg.get("task", "pairs") != "pairs":  # the documents' column, not the pairs' (old keys unchanged)
        parts += [data_cfg.task, data_cfg.text_column]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    folder = root / "tokenizers" / f"{data_cfg.name}-{vocab_size}-{key}"
    if (folder / "tokenizer.json").is_file():
        log.info("tokenizer: reusing %s", folder)
        return PreTrainedTokenizerFast.from_pretrained(folder)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    log.info("tokenizer: training a %d-token BPE on %d pairs", vocab_size, len(train_ds))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=not causal)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<unk>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )

    def texts():
        for batch in train_ds.iter(batch_size=1000):
            yield from (t for t in batch["source"] if t)
            yield from (t for t in batch["target"] if t)  # empty for a completion task's documents

    tok.train_from_iterator(texts(), trainer, length=2 * len(train_ds))
    if not causal:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                           special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its tokenizer is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tiny_marian(model_cfg, tokenizer) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer),
        d_model=model_cfg.d_model, encoder_layers=model_cfg.layers, decoder_layers=model_cfg.layers,
        encoder_attention_heads=model_cfg.heads, decoder_attention_heads=model_cfg.heads,
        encoder_ffn_dim=model_cfg.ffn_dim, decoder_ffn_dim=model_cfg.ffn_dim,
        dropout=model_cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=512, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=None,
    )
    model = MarianMTModel(config)
    model.generation_config.max_length = None
    model.generation_config.bad_words_ids = None
    return model


def tiny_gpt2(model_cfg, tokenizer) -> GPT2LMHeadModel:
    """A GPT-2 from the same size knobs as tiny_marian: d_model = n_embd, layers = n_layer, ..."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=model_cfg.max_positions, n_embd=model_cfg.d_model,
        n_layer=model_cfg.layers, n_head=model_cfg.heads, n_inner=model_cfg.ffn_dim,
        resid_pdrop=model_cfg.dropout, embd_pdrop=model_cfg.dropout, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.max_length = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def model_kind(name_or_path: str, kind: str = "auto", trust_remote_code: bool = False) -> str:
    """The family's name (mleps.families): `kind` when given, else the family the checkpoint's config says."""
    if kind != "auto":
        return family_named(kind).name
    return family_for_config(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)).name


def from_pretrained(name_or_path: str, trust_remote_code: bool = False, kind: str = "auto"):
    """Hub name or local folder. Weights are only read from safetensors files."""
    if not name_or_path:
        raise UserError("model=hf needs model.name_or_path=NAME_OR_FOLDER (e.g. t5-small)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        auto = family_named(model_kind(name_or_path, kind, trust_remote_code)).auto_model_class()
        model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:  # ValueError: a config the chosen Auto class does not know
        raise UserError(f"could not load model '{name_or_path}': {str(e).splitlines()[0][:300]}") from None
    _check_vocab(model, tokenizer, name_or_path)
    family_for(model).prepare_tokenizer(model, tokenizer)
    return model, tokenizer


def load_checkpoint(path: str, trust_remote_code: bool = False):
    """(model, tokenizer, mleps metadata) from a folder written by `save_pretrained` (and, for a LoRA
    run's checkpoint, its adapter: mleps.adapters)."""
    from mleps import adapters

    folder = data_path(path)
    if not folder.is_dir():
        raise UserError(f"checkpoint not found: {folder}")
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not (folder / "config.json").is_file() or not has_weights:
        raise UserError(
            f"{folder} holds no model files (config.json + *.safetensors): "
            f"pass a checkpoint folder written by mleps.train, e.g. RUN/checkpoints/last"
        )
    try:
        model, tokenizer = from_pretrained(str(folder), trust_remote_code)
        if adapters.has_adapter(folder):
            model = adapters.load(model, folder)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors, transformers and tokenizers raise many types)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if not _has_tokenizer(folder):
            what = "no tokenizer files (tokenizer.json / tokenizer_config.json)"
        elif type(e).__name__ == "SafetensorError" or "safetensors" in first.lower() or "deserializ" in first.lower():
            what = f"its files are truncated or corrupt ({first})"
        else:
            what = first
        raise UserError(f"could not load checkpoint {folder}: {what}: pass a complete checkpoint folder "
                        f"written by mleps.train") from None
    meta_file = folder / MLEPS_META
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except ValueError:
        raise UserError(f"could not load checkpoint {folder}: {MLEPS_META} is not valid JSON") from None
    # from_pretrained makes every parameter trainable (e.g. Marian's sinusoidal positions): freeze
    # again what the run froze, so fine-tuning and resumed optimizer states see the same parameters.
    frozen = set(meta.get("frozen_parameters", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model, tokenizer, meta


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model",
                                                      "vocab.json", "source.spm"))


def _check_vocab(model, tokenizer, where) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(
            f"tokenizer of {where} has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            f"use the tokenizer saved with this model"
        )


def num_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)

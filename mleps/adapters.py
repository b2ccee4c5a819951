"""LoRA adapters (the `peft` library) for every update rule: `model.peft=lora`.

`wrap(model, model_cfg, family)` freezes the model and adds a LoRA adapter to the modules named by
`model.lora_target_modules` (empty: the architecture's default below), so only the adapter's
tensors have requires_grad. Everything downstream selects parameters by requires_grad: the
optimizer, MGS's noise and guide, population decoding. Nothing else knows the model is adapted.

A checkpoint of an adapted model holds the frozen base as a plain transformers model (config.json,
model.safetensors, bit-identical to the weights the run started from) and the adapter as peft saves
it in `adapter/` (adapter_config.json, adapter_model.safetensors). The base must travel with the
adapter because the embedded tiny models are not on the hub; `load` rebuilds the adapted model
from the two, so evaluation decodes with exactly the weights training had and resume continues
the same tensors. peft loads it too:
`PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(CKPT), CKPT + "/adapter")`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mleps.errors import UserError

PEFT_METHODS = ("none", "lora")
ADAPTER_DIR = "adapter"  # beside the base's files; a subfolder, so transformers never mistakes the root for an adapter
# peft's own default targets per architecture, plus the ones it lacks (Marian: the attention's q/v
# projections, as for BART, which Marian's layers copy)
DEFAULT_TARGETS = {"marian": ["q_proj", "v_proj"]}


def check_config(model_cfg) -> None:
    """The model.peft / model.lora_* values that need no model to check."""
    method = model_cfg.get("peft", "none")
    if method not in PEFT_METHODS:
        raise UserError(f"model.peft={method} is not one of: {', '.join(PEFT_METHODS)}")
    if method == "none":
        return
    if model_cfg.lora_r < 1:
        raise UserError(f"model.lora_r={model_cfg.lora_r}: use a rank of 1 or more (e.g. 8)")
    if not model_cfg.lora_alpha > 0:
        raise UserError(f"model.lora_alpha={model_cfg.lora_alpha}: use a number above 0 (e.g. 16)")
    if not 0 <= model_cfg.lora_dropout < 1:
        raise UserError(f"model.lora_dropout={model_cfg.lora_dropout}: use a number in [0, 1)")


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _linear_names(model) -> list[str]:
    """The last name part of every module LoRA can adapt, for the error message."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def target_modules(model, model_cfg) -> list[str]:
    """model.lora_target_modules, or the architecture's default; each must name a module of `model`."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    targets = list(model_cfg.lora_target_modules or [])
    if not targets:
        defaults = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, **DEFAULT_TARGETS}
        if model_type not in defaults:
            raise UserError(f"model.peft=lora: no default LoRA targets for model type '{model_type}': set "
                            f"model.lora_target_modules=[...] (its layers: {', '.join(_linear_names(model))})")
        targets = list(defaults[model_type])
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]  # peft's own matching
    if missing:
        raise UserError(f"model.lora_target_modules: {type(model).__name__} has no module named "
                        f"{', '.join(missing)}: use names among {', '.join(_linear_names(model))}")
    return targets


def wrap(model, model_cfg, peft_task_type: str):
    """`model` with a fresh LoRA adapter (the caller's object is adapted in place, as peft does)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=peft_task_type, r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha,
                        lora_dropout=model_cfg.lora_dropout, target_modules=target_modules(model, model_cfg))
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target whose module type LoRA does not support
        raise UserError(f"model.peft=lora: {str(e).splitlines()[0][:300]}: change model.lora_target_modules") from None


def merged(model):
    """An adapted model as a plain one (its adapter added into the weights), for full fine-tuning."""
    return model.merge_and_unload()


def base_state_dict(model, state_dict: dict | None = None) -> dict:
    """The frozen base's tensors under the plain model's names: the adapter's tensors dropped and
    peft's `base_layer` level removed from the adapted modules' names."""
    state = state_dict if state_dict is not None else model.state_dict()
    tuner = model.base_model  # peft's LoraModel; its `prefix` starts every adapter tensor's name part
    prefix, outer = tuner.prefix, "base_model.model."
    return {key[len(outer):].replace(".base_layer.", "."): value for key, value in state.items()
            if not any(part.startswith(prefix) for part in key.split("."))}


def save(model, folder: Path, state_dict: dict | None = None) -> None:
    """The base (plain transformers files) in `folder`, the adapter in `folder/adapter`.
    state_dict: the adapted model's full state (gathered under FSDP); None: the model's own."""
    model.get_base_model().save_pretrained(folder, state_dict=base_state_dict(model, state_dict),
                                           safe_serialization=True)
    # the embeddings are in the base's files already (save_embedding_layers=False)
    model.save_pretrained(Path(folder) / ADAPTER_DIR, state_dict=state_dict, safe_serialization=True,
                          save_embedding_layers=False)


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_DIR / "adapter_config.json").is_file()


def load(base, folder: Path):
    """The adapted model of a checkpoint: its base with the adapter of `folder/adapter`, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, Path(folder) / ADAPTER_DIR, is_trainable=True)

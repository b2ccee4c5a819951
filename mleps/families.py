"""Model families: everything that differs between encoder-decoder and decoder-only models.

The trainers, the loop, the task losses and evaluation call a family through four verbs and
never ask which family they hold; loading (mleps.models), validation and the API ask it for its name
(`model.kind=<name>`), its transformers Auto class, its option checks and its tokenizer set-up. A new
family is one `Family` subclass with `@register_family` (tests/test_families.py registers one); a new
`model=<name>` option is one `@register_model` build function in mleps.models:

  collate(rows)                     token-id rows -> a padded training batch
  generate(model, inputs, ...)      output rows in the one format the rest of mleps reads:
                                    a start column, then the generated tokens, then EOS and padding
  logits(model, inputs, ids)        teacher-forced logits for such rows, [N, T-1, V], where
                                    logits[:, t] scores ids[:, t+1] given the source and ids[:, :t+1]
  token_cross_entropy(model, batch) the MLE loss of a training batch (sum over tokens, token count)

A batch always holds `input_ids` / `attention_mask` (the source, or the prompt) and `labels`
(the reference output through EOS, -100 as padding). What differs:

  seq2seq  the source is right-padded and encoded; rows start with the decoder start token and
           are the decoder's inputs (`decoder_input_ids`)
  causal   the prompt is left-padded, so every row's last prompt token sits in the same column
           and generation continues all rows from there; a row is the prompt followed by the
           output, position ids counted from the first real token (what `generate` does). The
           start column of an output row is the pad token (skipped when decoding text), and
           `generate`'s prompt columns are removed. `prompt_labels` are the prompt tokens the MLE
           loss also counts: all but the first (data.loss_on=all, the default) or none
           (data.loss_on=continuation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mleps.errors import UserError

SEQ2SEQ, CAUSAL = "seq2seq", "causal"  # the built-in families' names (model.kind=...)


def unwrap(model):
    """The model under a DDP wrapper (its config is what tells the family)."""
    return getattr(model, "module", model)


FAMILIES: list["Family"] = []  # tried in order by family_for; filled by register_family


def register_family(cls: type["Family"]) -> type["Family"]:
    """Class decorator: an adapter for the models its `handles` accepts. A family registered later is
    tried first, so a specific adapter (one architecture) can stand before a generic one."""
    taken = next((f for f in FAMILIES if f.name == cls.name), None)
    if taken is not None:
        raise UserError(f"a model family named '{cls.name}' is registered already ({type(taken).__qualname__}): "
                        f"give {cls.__qualname__} another name")
    FAMILIES.insert(0, cls())
    return cls


def family_names() -> list[str]:
    """The registered families' names, in registration order (the built-in ones first)."""
    return [f.name for f in reversed(FAMILIES)]


def family_named(name: str) -> "Family":
    """The family `model.kind=<name>` names."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"model.kind={name} is not one of: auto, {', '.join(family_names())}")


def family_for_config(config) -> "Family":
    """The family of a model from its transformers config (a checkpoint's config.json, before loading)."""
    for family in FAMILIES:
        if family.handles_config(config):
            return family
    raise TypeError(f"no model family handles a {type(config).__name__} (mleps.families.register_family)")


def family_for(model) -> "Family":
    inner = unwrap(model)
    for family in FAMILIES:
        if family.handles(inner):
            return family
    raise TypeError(f"no model family handles {type(inner).__name__} (mleps.families.register_family)")


def pad_id(model) -> int:
    config = unwrap(model).generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else unwrap(model).config.pad_token_id
    if pad is None:  # e.g. GPT-2: the first EOS id pads
        eos = config.eos_token_id
        pad = eos if isinstance(eos, int) else eos[0]
    return pad


def _sampling_kwargs(kwargs: dict) -> dict:
    if kwargs.get("do_sample"):  # leave top-k/top-p at "off" so samples come from p_theta itself
        kwargs.update(top_k=0, top_p=1.0)
    else:
        kwargs.pop("temperature", None)
    return kwargs


def _nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
         reduction: str = "sum") -> torch.Tensor:
    """Token cross-entropy; -100 labels count nothing (cross_entropy never builds a full log-softmax copy)."""
    out = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                          label_smoothing=label_smoothing, reduction=reduction)
    return out if reduction == "sum" else out.view_as(labels)


class Family:
    name: str  # model.kind=<name>; unique among the registered families
    auto_class: str  # the transformers Auto class that loads a checkpoint of this family
    padding_side: str  # of sources / prompts
    peft_task_type: str  # the PeftModel class a LoRA adapter wraps the model in (mleps.adapters)

    def handles(self, model) -> bool:
        """Whether this adapter serves `model` (unwrapped); by default, what its config says."""
        return self.handles_config(model.config)

    def handles_config(self, config) -> bool:
        """Whether this adapter serves models with this transformers config (a checkpoint's, before loading)."""
        raise NotImplementedError

    def auto_model_class(self):
        """The transformers Auto class named by `auto_class` (transformers imported when first asked)."""
        import transformers

        return getattr(transformers, self.auto_class)

    def check_options(self, data) -> None:
        """Data options this family cannot train on: a UserError naming the key (the family is known from the
        config, or once the model is loaded)."""

    def prepare_tokenizer(self, model, tokenizer) -> None:
        """After loading a pretrained model and its tokenizer: whatever generation and padding need."""

    def collator(self, tokenizer, model, loss_on: str | None = None):
        """A function from token-id rows ({"input_ids": [...], "labels": [...]}) to a padded training batch."""
        raise NotImplementedError

    def generate(self, model, inputs: dict, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, model, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_cross_entropy(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def prompt_nll(self, model, inputs: dict) -> torch.Tensor:
        """Per row, the NLL the model gives its own input (a decoder-only prompt's tokens after the
        first); an encoder-decoder's source is not generated, so 0."""
        return torch.zeros(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)

    def reference_rows(self, batch: dict, model) -> torch.Tensor:
        """The batch's references as output rows (start column, labels through EOS, padding)."""
        labels = batch["labels"]
        start = torch.full((labels.shape[0], 1), self.start_id(model), dtype=labels.dtype, device=labels.device)
        return torch.cat([start, labels.masked_fill(labels == -100, pad_id(model))], 1)

    def start_id(self, model) -> int:
        raise NotImplementedError

    def encode_sources(self, tokenizer, texts: list[str], max_length: int) -> dict:
        """Sources (or prompts) as a padded batch on the CPU."""
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                         padding_side=self.padding_side)


@register_family
class Seq2SeqFamily(Family):
    name, auto_class, padding_side, peft_task_type = SEQ2SEQ, "AutoModelForSeq2SeqLM", "right", "SEQ_2_SEQ_LM"

    def handles_config(self, config) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def check_options(self, data) -> None:
        if data.task == "completion":
            raise UserError("data.task=completion needs a decoder-only model (model=tiny_gpt2, or model=hf with a "
                            "causal LM such as gpt2): this model is an encoder-decoder")
        if data.loss_on is not None:
            raise UserError(f"data.loss_on={data.loss_on} is for decoder-only models (whose input is part of the "
                            f"text): an encoder-decoder's loss is always on the target; drop data.loss_on")

    def start_id(self, model) -> int:
        return unwrap(model).config.decoder_start_token_id

    def generate(self, model, inputs: dict, **kwargs) -> torch.Tensor:
        return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              **_sampling_kwargs(kwargs))

    def logits(self, model, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     decoder_input_ids=ids[:, :-1]).logits

    def token_cross_entropy(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        labels = batch["labels"]
        return _nll(logits, labels, label_smoothing), int((labels != -100).sum())

    def collator(self, tokenizer, model, loss_on: str | None = None):
        from transformers import DataCollatorForSeq2Seq

        pad = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, return_tensors="pt")

        def collate(rows: dict) -> dict:
            return dict(pad([{"input_ids": i, "attention_mask": [1] * len(i), "labels": l}
                             for i, l in zip(rows["input_ids"], rows["labels"])]))
        return collate


@register_family
class CausalFamily(Family):
    name, auto_class, padding_side, peft_task_type = CAUSAL, "AutoModelForCausalLM", "left", "CAUSAL_LM"

    def handles_config(self, config) -> bool:
        return not getattr(config, "is_encoder_decoder", False)

    def check_options(self, data) -> None:
        if data.task != "completion":
            raise UserError("a decoder-only model trains on data.task=completion (e.g. data=completion): "
                            "source -> target pairs need an encoder-decoder (model=tiny_marian)")

    def prepare_tokenizer(self, model, tokenizer) -> None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token: its EOS pads (after EOS, unread)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    def start_id(self, model) -> int:
        return pad_id(model)

    def generate(self, model, inputs: dict, **kwargs) -> torch.Tensor:
        prompt = inputs["input_ids"]
        out = model.generate(input_ids=prompt, attention_mask=inputs["attention_mask"], pad_token_id=pad_id(model),
                             **_sampling_kwargs(kwargs))
        start = torch.full((out.shape[0], 1), pad_id(model), dtype=out.dtype, device=out.device)
        return torch.cat([start, out[:, prompt.shape[1]:]], 1)  # the prompt is not part of the output

    def _forward(self, model, prompt: torch.Tensor, prompt_mask: torch.Tensor, continuation: torch.Tensor):
        """Logits of [prompt | continuation]; positions as `generate` counts them (from the first real token)."""
        ids = torch.cat([prompt, continuation], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(continuation)], 1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    def logits(self, model, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        width = inputs["input_ids"].shape[1]
        # The last prompt position scores the first output token: columns width-1 .. end-1.
        return self._forward(model, inputs["input_ids"], inputs["attention_mask"], ids[:, 1:])[:, width - 1:-1]

    def prompt_nll(self, model, inputs: dict) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits[:, :-1]
        scored = mask[:, 1:] & mask[:, :-1]  # a token with a real token before it (left padding)
        return _nll(logits, ids[:, 1:].masked_fill(~scored, -100), reduction="none").sum(1)

    def token_cross_entropy(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        continuation = labels.masked_fill(labels == -100, pad_id(model))
        logits = self._forward(model, batch["input_ids"], batch["attention_mask"], continuation)[:, :-1]
        targets = torch.cat([batch["prompt_labels"][:, 1:], labels], 1)  # logits[:, t] scores token t+1
        return _nll(logits, targets, label_smoothing), int((targets != -100).sum())

    def collator(self, tokenizer, model, loss_on: str | None = None):
        pad, prompt_in_loss = pad_id(model), (loss_on or "all") == "all"

        def collate(rows: dict) -> dict:
            prompts, conts = rows["input_ids"], rows["labels"]
            width, length = max(map(len, prompts)), max(map(len, conts))
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
            labels = torch.tensor([list(c) + [-100] * (length - len(c)) for c in conts], dtype=torch.long)
            # A prompt token is scored when it has a real token before it (the first one has none).
            scored = (mask.bool() & torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1).bool()) & prompt_in_loss
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                    "prompt_labels": input_ids.masked_fill(~scored, -100)}
        return collate


# -- scoring output rows (the rules' log-probabilities, the lm task loss's NLL)
def label_mask(labels: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """True for labels up to and including the first EOS of their row; what follows is padding."""
    is_eos = torch.isin(labels, torch.tensor(eos, device=labels.device)).long()
    eos_before = is_eos.cumsum(1) - is_eos  # EOS count strictly before each position
    return eos_before == 0


def sequence_log_probs(model, batch: dict, ids: torch.Tensor, source_index: torch.Tensor, eos: list[int],
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x) summed over each row's tokens through EOS, and the token counts.

    Row n of `ids` (decoder start first) is an output for source `source_index[n]`; `lengths`
    (from pad_rows) bounds rows padded after no EOS, as when max_new_tokens cut a sample off.
    One teacher-forced pass for all rows; sources are repeated rather than encoded once, so
    the call goes through the (possibly DDP-wrapped) model like any forward.
    """
    log_probs, mask = token_log_probs(model, batch, ids, source_index, eos, lengths)
    return log_probs.sum(1), mask.sum(1)


def token_log_probs(model, batch: dict, ids: torch.Tensor, source_index: torch.Tensor, eos: list[int],
                    lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_log_probs token by token: (N, T-1) log p of each label (0 past a row's end) and its mask."""
    labels = ids[:, 1:]
    mask = label_mask(labels, eos)
    if lengths is not None:
        mask &= torch.arange(labels.shape[1], device=ids.device) < (lengths - 1).unsqueeze(1)
    inputs = {k: batch[k][source_index] for k in ("input_ids", "attention_mask")}
    logits = family_for(model).logits(model, inputs, ids)
    # cross_entropy with ignore_index leaves 0 at padding and never builds a full log-softmax copy.
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.masked_fill(~mask, -100).flatten(),
                                ignore_index=-100, reduction="none")
    return -token_nll.view_as(labels), mask

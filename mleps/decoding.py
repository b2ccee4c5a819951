"""Decoding with `generate`: ids for the update rules, texts in dataset order for evaluation,
and `DecodedBatch`, the one input every task loss (mleps.task_loss) receives."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mleps.families import family_for


def generate(model, batch: dict, *, max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
             num_return_sequences: int = 1, temperature: float = 1.0, length_penalty: float = 1.0) -> torch.Tensor:
    """Output rows (a start column, the generated tokens, then EOS and padding; never the prompt) for a
    padded batch, in the model family's layout (mleps.families); the model is put in eval mode."""
    was_training = model.training
    model.eval()
    kwargs = dict(do_sample=do_sample, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                  num_beams=num_beams, length_penalty=length_penalty, temperature=temperature)
    sharded = _fully_sharded(model)
    if sharded:  # FSDP: each forward gathers weights from every process, so all step until all stop
        kwargs["synced_gpus"] = True
    with torch.no_grad(), (_root_gathered(model) if sharded else nullcontext()):
        out = family_for(model).generate(model, batch, **kwargs)
    model.train(was_training)
    return out


def _fully_sharded(model) -> bool:
    """The model is an FSDP2 root (a parameter's type says less: FSDP2 swaps a unit's DTensor shards for
    plain tensors while the unit is gathered)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def _root_gathered(model):
    """FSDP2 gathers a unit's parameters in the unit's forward hooks. An encoder-decoder's generate calls
    the encoder, never the root's forward, so (1) torch has not yet decided which unit is the root if no
    training forward ran first (it raises "requires running forward through the root module first"), and
    (2) the root's own parameters (those in no layer unit, e.g. Marian's position tables) stay shards.
    Both are settled before the call; the root is sharded again after it."""
    model._get_fsdp_state()._lazy_init()  # what the root's first forward does; torch has no public call
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def to_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)]


def eos_ids(model) -> list[int]:
    """The ids that end a generated sequence (a generation config may list several)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@dataclass
class DecodedBatch:
    """Decoded outputs, one row per output, as a task loss sees them.

    texts           detokenised outputs (special tokens dropped), what text metrics score
    token_ids       the generated tokens, without the decoder start token and without EOS and padding
    ended_with_eos  False for an output that reached max_new_tokens without EOS (non-terminated);
                    one that emits EOS as its last allowed token is terminated
    references      each row's reference texts
    sources         each row's source text (None when the caller has none)
    ids             generate's rows as they came (start column first), for model-based losses
    encoder_inputs  input_ids / attention_mask, row n = the source (a decoder-only model's prompt) of
                    output n, for model-based losses (mleps.families: logits(model, encoder_inputs, ids))
    columns         the dataset's other columns, name -> one value per output (mleps.api datasets)
    """

    texts: list[str]
    token_ids: list[list[int]]
    ended_with_eos: list[bool]
    references: list[list[str]]
    sources: list[str] | None = None
    ids: torch.Tensor | None = None
    encoder_inputs: dict | None = None
    columns: dict | None = None

    @property
    def lengths(self) -> list[int]:
        """Generated tokens per output (EOS not counted)."""
        return [len(t) for t in self.token_ids]

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows) -> "DecodedBatch":
        """The outputs at `rows` (a list of indices), e.g. the halves of a batch."""
        rows = list(rows)
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        index = torch.tensor(rows, dtype=torch.long)
        return DecodedBatch(
            texts=pick(self.texts), token_ids=pick(self.token_ids), ended_with_eos=pick(self.ended_with_eos),
            references=pick(self.references), sources=pick(self.sources),
            ids=None if self.ids is None else self.ids[index.to(self.ids.device)],
            encoder_inputs=None if self.encoder_inputs is None else
            {k: v[index.to(v.device)] for k, v in self.encoder_inputs.items()},
            columns=None if self.columns is None else {k: pick(v) for k, v in self.columns.items()})


def decoded_batch(ids: torch.Tensor, tokenizer, eos: list[int], references, *, batch: dict | None = None,
                  source_index: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> DecodedBatch:
    """A DecodedBatch from `generate`'s ids (decoder start token first). Built once per decode.

    references  one list of references per row (repeat them for several samples per source)
    batch       the encoded sources (input_ids, attention_mask, optionally "sources"); row n of
                `ids` belongs to source `source_index[n]` (default: source n)
    lengths     row lengths including the start token, for rows padded without EOS (pad_rows)
    """
    rows = ids.tolist()
    limits = lengths.tolist() if lengths is not None else [len(r) for r in rows]
    eos_set = set(eos)
    token_ids, ended = [], []
    for row, limit in zip(rows, limits):
        generated = row[1:limit]
        cut = next((i for i, t in enumerate(generated) if t in eos_set), None)
        ended.append(cut is not None)
        token_ids.append(generated if cut is None else generated[:cut])
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(rows):
        raise ValueError(f"got {len(rows)} outputs but {len(refs)} reference lists; they must match")
    sources, encoder_inputs, columns = None, None, None
    if batch is not None:
        index = source_index if source_index is not None else torch.arange(len(rows), device=ids.device)
        encoder_inputs = {k: batch[k][index.to(batch[k].device)] for k in ("input_ids", "attention_mask") if k in batch}
        if batch.get("sources") is not None:
            sources = [batch["sources"][i] for i in index.tolist()]
        if batch.get("columns"):
            columns = {k: [v[i] for i in index.tolist()] for k, v in batch["columns"].items()}
    return DecodedBatch(texts=to_texts(tokenizer, ids), token_ids=token_ids, ended_with_eos=ended, references=refs,
                        sources=sources, ids=ids, encoder_inputs=encoder_inputs, columns=columns)


def decode_sources(model, tokenizer, sources: list[str], decode_cfg, *, references=None, source_prefix: str = "",
                   max_source_length: int = 512, progress: bool = False, desc: str = "decode", columns=None):
    """Yield (dataset indices, DecodedBatch) batch by batch. Sorting by length keeps padding (and time) low.
    `columns`: extra dataset columns (name -> one value per source) for the task losses."""
    device = next(model.parameters()).device
    eos = eos_ids(model)
    family = family_for(model)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    size = decode_cfg.batch_size
    for start in tqdm(range(0, len(order), size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + size]
        enc = family.encode_sources(tokenizer, [source_prefix + sources[i] for i in idx], max_source_length).to(device)
        out = generate(model, enc, max_new_tokens=decode_cfg.max_new_tokens, num_beams=decode_cfg.num_beams,
                       length_penalty=decode_cfg.length_penalty)
        refs = [references[i] for i in idx] if references is not None else [[] for _ in idx]
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "sources": [sources[i] for i in idx]}
        if columns:
            batch["columns"] = {k: [v[i] for i in idx] for k, v in columns.items()}
        yield idx, decoded_batch(out, tokenizer, eos, refs, batch=batch)


def translate(model, tokenizer, sources: list[str], decode_cfg, *, source_prefix: str = "",
              max_source_length: int = 512, progress: bool = False, desc: str = "decode") -> list[str]:
    """Hypotheses for `sources`, in their order."""
    hyps: list[str] = [""] * len(sources)
    for idx, decoded in decode_sources(model, tokenizer, sources, decode_cfg, source_prefix=source_prefix,
                                       max_source_length=max_source_length, progress=progress, desc=desc):
        for i, text in zip(idx, decoded.texts):
            hyps[i] = text
    return hyps

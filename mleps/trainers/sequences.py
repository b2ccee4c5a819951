"""Sampled outputs and their log-probabilities, shared by the sequence-level rules (pg, mrt).

`generate` returns rows that start with a start column (the decoder start token; the pad token
for a decoder-only model, whose prompt is not part of the row) and, once a row has emitted EOS,
go on with padding. Read as teacher forcing (mleps.families `logits`): labels are ids[:, 1:],
and a row's labels count up to and including its first EOS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mleps.decoding import eos_ids, generate  # noqa: F401  (eos_ids: imported from here by the rules)
from mleps.errors import UserError
from mleps.families import family_for


def check_sampling_config(cfg) -> None:
    """The knobs pg and mrt share (SequenceSamplingConfig)."""
    if cfg.num_samples < 1:
        raise UserError(f"trainer.num_samples={cfg.num_samples}: use 1 or more")
    if not cfg.sample_temperature > 0:
        raise UserError(f"trainer.sample_temperature={cfg.sample_temperature}: use a number > 0")
    if not cfg.mle_mix >= 0:
        raise UserError(f"trainer.mle_mix={cfg.mle_mix}: use a number >= 0")
    if cfg.max_new_tokens < 1:
        raise UserError(f"trainer.max_new_tokens={cfg.max_new_tokens}: use 1 or more")


def sample(model, batch: dict, *, num_samples: int, temperature: float, max_new_tokens: int,
           seed: int) -> torch.Tensor:
    """(B·K, T) ancestral samples; source i owns rows i·K .. i·K+K-1 (generate's order)."""
    torch.manual_seed(seed)  # a function of (run seed, step): reruns and resumes draw the same samples
    return generate(model, batch, max_new_tokens=max_new_tokens, do_sample=True,
                    num_return_sequences=num_samples, temperature=temperature)


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
    labels = ids[:, 1:]
    mask = label_mask(labels, eos)
    if lengths is not None:
        mask &= torch.arange(labels.shape[1], device=ids.device) < (lengths - 1).unsqueeze(1)
    inputs = {k: batch[k][source_index] for k in ("input_ids", "attention_mask")}
    logits = family_for(model).logits(model, inputs, ids)
    # cross_entropy with ignore_index leaves 0 at padding and never builds a full log-softmax copy.
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.masked_fill(~mask, -100).flatten(),
                                ignore_index=-100, reduction="none")
    return -token_nll.view_as(labels).sum(1), mask.sum(1)


def trim(ids: torch.Tensor, eos: list[int]) -> list[tuple[int, ...]]:
    """Each row as a tuple of ids through its first EOS: equal tuples are the same output."""
    lengths = 1 + label_mask(ids[:, 1:], eos).sum(1)
    return [tuple(row[:n]) for row, n in zip(ids.tolist(), lengths.tolist())]


def pad_rows(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, longest) ids and the N row lengths."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


def distinct_per_source(rows: list[tuple[int, ...]], num_samples: int) -> float:
    """Mean number of different outputs among each source's K samples."""
    groups = [rows[i:i + num_samples] for i in range(0, len(rows), num_samples)]
    return sum(len(set(g)) for g in groups) / len(groups)

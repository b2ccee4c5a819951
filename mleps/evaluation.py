"""Decode a split and score it: what validation (mleps.loop) and `python -m mleps.evaluate` share.

`evaluate_split` is the whole pipeline (decode -> score -> reference cross-entropy -> report); the
functions below it are its steps.
A split (or one process's shard of it) is decoded in length-sorted batches; every task loss adds
up its statistics over the batches (so processes can sum theirs), and `metric_report` turns the
summed statistics into the reported numbers: the primary loss's report (a text metric's library
details), its loss, the secondary metrics' scores, and the references' cross-entropy.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mleps.decoding import decode_sources
from mleps.families import family_for


def evaluate_split(model, tokenizer, ds, tokenized, collate, decode_cfg, metrics, *, shard=(0, 1), reduce=None,
                   columns=None, per_example: list | None = None, **decode_kwargs) -> tuple[list[str], dict]:
    """(hypotheses, metric_report) of a split `ds` (source and references columns) and `tokenized`, the same
    split tokenized for the references' cross-entropy. `shard` = (rank, world): this process decodes every
    world-th example; `reduce(summed, hyps)` then returns the statistics summed and the texts gathered over
    the processes (None: this process holds the whole split). `columns`: extra column names the task losses
    read; `per_example` and `decode_kwargs` as in decode_and_score."""
    rank, world = shard
    if columns is not None:
        decode_kwargs["columns"] = {c: ds[c][rank::world] for c in columns}
    hyps, stats = decode_and_score(model, tokenizer, ds["source"][rank::world], ds["references"][rank::world],
                                   decode_cfg, metrics, per_example=per_example, **decode_kwargs)
    if world > 1:
        tokenized = tokenized.select(range(rank, len(tokenized), world))
    cross_entropy = reference_cross_entropy(model, tokenized, collate, decode_cfg.batch_size)
    # One array of every sum, so that processes add theirs up in one collective.
    summed = np.concatenate([*stats, cross_entropy])
    if reduce is not None:
        summed, hyps = reduce(summed, hyps)
    stats = np.split(summed[:-2], np.cumsum([m.num_stats for m in metrics])[:-1])
    return hyps, metric_report(metrics, stats, hyps, ds["references"], *summed[-2:])


def decode_and_score(model, tokenizer, sources, references, decode_cfg, metrics, per_example: list | None = None,
                     **decode_kwargs):
    """(hypotheses in dataset order, each metric's summed statistics) for one shard of a split;
    `decode_kwargs` are mleps.decoding.decode_sources's (source_prefix, max_source_length, columns, ...).
    With a `per_example` list, it is filled with one dict per output in dataset order: generated tokens,
    whether it ended with EOS, and each metric's loss of that output alone (metrics with a sentence form)."""
    hyps = [""] * len(sources)
    rows: list[dict | None] = [None] * len(sources)
    stats = [np.zeros(m.num_stats) for m in metrics]
    for idx, decoded in decode_sources(model, tokenizer, sources, decode_cfg, references=references, **decode_kwargs):
        for i, text in zip(idx, decoded.texts):
            hyps[i] = text
        if per_example is None:
            stats = [total + m.stats(decoded) for total, m in zip(stats, metrics)]
        else:
            both = [m.stats_and_sentence_losses(decoded) if m.has_sentence_form else (m.stats(decoded), None)
                    for m in metrics]
            stats = [total + batch_stats for total, (batch_stats, _) in zip(stats, both)]
            losses = {m.name: sentence for m, (_, sentence) in zip(metrics, both) if sentence is not None}
            for n, i in enumerate(idx):
                rows[i] = {"tokens": decoded.lengths[n], "ended": decoded.ended_with_eos[n],
                           **{name: values[n] for name, values in losses.items()}}
    if per_example is not None:
        per_example.extend(rows)
    return hyps, stats


def reference_cross_entropy(model, tokenized, collate, batch_size: int) -> np.ndarray:
    """[token cross-entropy summed over the references, tokens] of a tokenized split (no dropout)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokenized), batch_size):
            batch = collate(tokenized[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            loss_sum, n = family_for(model).token_cross_entropy(model, batch)
            total, tokens = total + float(loss_sum), tokens + n
    model.train(was_training)
    return np.array([total, float(tokens)])


def metric_report(metrics, stats, hyps, references, cross_entropy_sum: float, tokens: float) -> dict:
    """The primary metric (its library's details for a text metric), its loss, the secondary metrics'
    scores and the references' cross-entropy / perplexity."""
    primary = metrics[0]
    result = primary.report(stats[0], hyps, references)
    result["loss"] = primary.loss_from_stats(stats[0])
    for m, s in zip(metrics[1:], stats[1:]):
        result[m.name] = m.score_from_stats(s)
    cross_entropy = cross_entropy_sum / tokens if tokens else float("nan")
    result.update(cross_entropy=cross_entropy, perplexity=math.exp(min(cross_entropy, 700)))
    return result

"""Sequence-level task losses beyond the text metrics, and the factory for all of them.

Each follows mleps.task_loss.TaskLoss; docs/metrics.md lists statistics, levels and ranges.

  repetition      seq-rep-n on generated token ids: 1 - |distinct n-grams| / |n-grams| of an output;
                  corpus level pools the n-gram counts over the outputs
  seq_rep         seq-rep-n as Welleck et al. report it: per output (trimmed at EOS), averaged over the
                  outputs with at least n tokens
  nontermination  1 for an output that hit max_new_tokens without EOS, else 0
  edit            Levenshtein distance to the closest reference / the longer of the two (words or chars)
  length          |len(hyp)/len(ref) - 1| in words (closest reference); corpus: |Σ hyp / Σ ref - 1|
  lm              NLL of the output under a frozen score model: per token (reduction=mean, statistics
                  nll_sum, tokens) or of the whole sequence (reduction=sum, MGS-LM: nll_sum, sequences)
  custom          a user's callable: fn(decoded) -> one float loss per output
  composite       Σ_i w_i loss_i, statistics concatenated
"""
from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein

from mleps.errors import UserError
from mleps.metrics import METRIC_NAMES, build_metric
from mleps.task_loss import TaskLoss, _mean

LOSS_NAMES = (*METRIC_NAMES, "repetition", "seq_rep", "nontermination", "edit", "length", "lm", "custom", "composite")
REDUCTIONS = ("mean", "sum")
UNITS = ("word", "char")


def _units(text: str, unit: str):
    return text.split() if unit == "word" else text


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
    return unit


class Repetition(TaskLoss):
    """seq-rep-n (Welleck et al., 2020) on the model's tokens; corpus level pools the n-gram counts."""

    name = "repetition"

    def __init__(self, level: str = "corpus", n: int = 4):
        super().__init__(level)
        if int(n) < 1:
            raise ValueError(f"repetition needs n >= 1 (got {n})")
        self.n = int(n)

    def _counts(self, tokens: list[int]) -> tuple[int, int]:
        ngrams = [tuple(tokens[i:i + self.n]) for i in range(len(tokens) - self.n + 1)]
        return len(ngrams) - len(set(ngrams)), len(ngrams)

    def sentence_losses(self, decoded):
        return [_mean(self._counts(t)) for t in decoded.token_ids]  # fewer than n tokens: 0

    def corpus_stats(self, decoded):
        counts = [self._counts(t) for t in decoded.token_ids]
        return np.array([float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts))])


class SeqRep(Repetition):
    """seq-rep-n per output, 1 - unique/total n-grams, averaged over the outputs with at least n tokens
    (the paper's tables; wellecks/mgs). The sentence form gives an output shorter than n a 0."""

    name = "seq_rep"

    def _share(self, tokens: list[int]) -> float | None:
        repeated, total = self._counts(tokens)
        return repeated / total if total else None

    def sentence_losses(self, decoded):
        return [self._share(t) or 0.0 for t in decoded.token_ids]

    def corpus_stats(self, decoded):
        shares = [x for x in map(self._share, decoded.token_ids) if x is not None]
        return np.array([float(sum(shares)), float(len(shares))])

    def corpus_loss_from_stats(self, stats):
        return _mean(stats)


class NonTermination(TaskLoss):
    """The share of outputs that reached the length limit without EOS (the same at both levels)."""

    name = "nontermination"

    def sentence_losses(self, decoded):
        return [0.0 if ended else 1.0 for ended in decoded.ended_with_eos]


def levenshtein(a, b) -> int:
    """Plain dynamic programming; the reference for rapidfuzz in the tests and the benchmark."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


class EditDistance(TaskLoss):
    """min over references of Levenshtein(hyp, ref) / max(|hyp|, |ref|), in [0, 1]; rapidfuzz computes
    it (on word lists too), over 1000x faster than plain Python here (python -m mleps.losses)."""

    name = "edit"

    def __init__(self, level: str = "corpus", unit: str = "word"):
        super().__init__(level)
        self.unit = _check_unit(unit)

    def _one(self, hyp: str, refs: list[str]) -> float:
        h = _units(hyp, self.unit)
        return min((Levenshtein.normalized_distance(h, _units(r, self.unit)) for r in refs if r), default=1.0)

    def sentence_losses(self, decoded):
        return [self._one(h, r) for h, r in zip(decoded.texts, decoded.references)]


class LengthRatio(TaskLoss):
    """|len(hyp)/len(ref) - 1| with the closest reference's length; corpus level pools the lengths."""

    name = "length"

    def __init__(self, level: str = "corpus", unit: str = "word"):
        super().__init__(level)
        self.unit = _check_unit(unit)

    def _lengths(self, decoded) -> list[tuple[int, int]]:
        out = []
        for hyp, refs in zip(decoded.texts, decoded.references):
            h = len(_units(hyp, self.unit))
            ref_lengths = [len(_units(r, self.unit)) for r in refs if r] or [0]
            out.append((h, min(ref_lengths, key=lambda r: (abs(r - h), r))))  # closest, the shorter on ties
        return out

    def sentence_losses(self, decoded):
        return [abs(h / max(r, 1) - 1) for h, r in self._lengths(decoded)]

    def corpus_stats(self, decoded):
        lengths = self._lengths(decoded)
        return np.array([float(sum(h for h, _ in lengths)), float(sum(r for _, r in lengths))])

    def corpus_loss_from_stats(self, stats):
        return abs(stats[0] / max(stats[1], 1) - 1)


class LMScore(TaskLoss):
    """NLL of the outputs (through EOS) given their sources under a frozen score model: a copy of the
    run's model taken by `bind` (the reference implementation's choice), or the checkpoint at
    `score_model`. reduction=mean: per token; reduction=sum: of the whole sequence, a decoder-only
    model's prompt included (the reference's MGS-LM loss: a looping, non-terminating output costs the
    NLL of every token it adds). No-grad teacher-forced forwards, a bounded number of tokens at a time."""

    name = "lm"

    def __init__(self, level: str = "corpus", score_model: str | None = None, reduction: str = "mean",
                 tokens_per_forward: int = 16_384):
        super().__init__(level)
        self.tokens_per_forward = tokens_per_forward  # rows x width per forward: bounds the [rows, width, vocab] logits
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown lm reduction {reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.score_model_path = score_model
        if score_model and not Path(score_model).expanduser().is_dir():
            raise UserError(f"metric.score_model={score_model} is not a folder: pass a checkpoint folder "
                            f"(e.g. RUN/checkpoints/best), or null for a frozen copy of the model at the start")
        self.model, self.eos = None, None

    def bind(self, model, tokenizer) -> None:
        from mleps.decoding import eos_ids
        from mleps.models import load_checkpoint

        if self.score_model_path:
            scorer = load_checkpoint(str(Path(self.score_model_path).expanduser()))[0]
            if scorer.config.vocab_size != model.config.vocab_size:
                raise UserError(f"metric.score_model={self.score_model_path} has a vocabulary of "
                                f"{scorer.config.vocab_size}, the model {model.config.vocab_size}: use a score "
                                f"model trained with the same tokenizer")
        else:
            scorer = copy.deepcopy(model)
        self.model = scorer.to(next(model.parameters()).device).eval().requires_grad_(False)
        self.eos = eos_ids(model)

    def _nll(self, decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL summed over each output's tokens, plus its prompt's with reduction=sum; token counts)."""
        from mleps.families import family_for
        from mleps.trainers.sequences import sequence_log_probs

        if self.model is None:
            raise RuntimeError("metric=lm needs a score model: call bind(model, tokenizer) first")
        if decoded.ids is None or decoded.encoder_inputs is None:
            raise ValueError("metric=lm needs the decoded ids and the encoded sources (decoded_batch(..., batch=))")
        family, device = family_for(self.model), self.model.device
        # a row's labels never run past its own generated tokens (EOS included when it has one)
        lengths = torch.tensor([1 + len(t) + e for t, e in zip(decoded.token_ids, decoded.ended_with_eos)])
        rows_per_forward = max(1, self.tokens_per_forward // max(decoded.ids.shape[1], 1))
        nll, tokens = [], []
        with torch.no_grad():
            for start in range(0, len(decoded), rows_per_forward):
                rows = slice(start, start + rows_per_forward)
                inputs = {k: v[rows].to(device) for k, v in decoded.encoder_inputs.items()}
                ids = decoded.ids[rows].to(device)
                log_probs, counts = sequence_log_probs(self.model, inputs, ids, torch.arange(len(ids), device=device),
                                                       self.eos, lengths[rows].to(device))
                if self.reduction == "sum":
                    log_probs = log_probs - family.prompt_nll(self.model, inputs)
                nll.append(-log_probs.double().cpu())
                tokens.append(counts.double().cpu())
        return torch.cat(nll), torch.cat(tokens)

    def sentence_losses(self, decoded):
        nll, tokens = self._nll(decoded)
        return (nll if self.reduction == "sum" else nll / tokens.clamp(min=1)).tolist()

    def corpus_stats(self, decoded):
        nll, tokens = self._nll(decoded)
        return np.array([float(nll.sum()), float(len(nll) if self.reduction == "sum" else tokens.sum())])


class Custom(TaskLoss):
    """A user's callable `fn(decoded: DecodedBatch) -> Sequence[float]`, one finite loss per output
    (lower is better); pooled as the mean at both levels. `fn` is "package.module:function"."""

    name = "custom"

    def __init__(self, level: str = "corpus", fn: str | None = None):
        super().__init__(level)
        self.fn_name = fn
        self.fn = load_callable(fn)

    def sentence_losses(self, decoded):
        out = self.fn(decoded)
        try:
            losses = [float(x) for x in out]
        except (TypeError, ValueError):
            raise UserError(f"metric.fn={self.fn_name} returned {type(out).__name__}: it must return one float "
                            f"per output (a list of {len(decoded)})") from None
        if len(losses) != len(decoded):
            raise UserError(f"metric.fn={self.fn_name} returned {len(losses)} values for {len(decoded)} outputs: "
                            f"it must return one float per output")
        if not all(math.isfinite(x) for x in losses):
            raise UserError(f"metric.fn={self.fn_name} returned a non-finite value (NaN or inf): every loss must "
                            f"be a finite float")
        return losses


def load_callable(spec: str | None):
    if not spec or ":" not in str(spec):
        raise UserError(f"metric=custom needs metric.fn=package.module:function (got {spec!r})")
    module_name, _, attr = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"metric.fn={spec} cannot be imported ({type(e).__name__}: {e}): put the module on "
                        f"PYTHONPATH and name it as package.module:function") from None
    if not callable(fn):
        raise UserError(f"metric.fn={spec} is not callable: name a function")
    return fn


class Composite(TaskLoss):
    """Σ_i w_i loss_i. The statistics are the components' concatenated, so pooling and all-reduce
    work unchanged; the sentence form exists when every component has one."""

    name = "composite"

    def __init__(self, components: list[TaskLoss], weights: list[float], level: str = "corpus"):
        super().__init__(level)
        self.components, self.weights = components, weights
        self.num_stats = sum(c.num_stats for c in components)

    @property
    def has_sentence_form(self) -> bool:
        return all(c.has_sentence_form for c in self.components)

    def stats(self, decoded):
        return np.concatenate([np.asarray(c.stats(decoded), dtype=np.float64) for c in self.components])

    def parts(self, stats) -> list[float]:
        """Each component's loss from the concatenated statistics."""
        bounds = np.cumsum([0] + [c.num_stats for c in self.components])
        return [c.loss_from_stats(stats[a:b]) for c, a, b in zip(self.components, bounds[:-1], bounds[1:])]

    def loss_from_stats(self, stats):
        return float(sum(w * x for w, x in zip(self.weights, self.parts(np.asarray(stats, dtype=np.float64)))))

    def sentence_losses(self, decoded):
        per_component = [c.sentence_losses(decoded) for c in self.components]
        return [sum(w * x for w, x in zip(self.weights, row)) for row in zip(*per_component)]

    def bind(self, model, tokenizer) -> None:
        for c in self.components:
            c.bind(model, tokenizer)

    def __repr__(self) -> str:
        return f"Composite({', '.join(f'{w}*{c.name}' for w, c in zip(self.weights, self.components))})"


def build_task_loss(name: str, level: str = "corpus", *, tokenizer=None, rouge_key: str = "rougeL", n: int = 4,
                    unit: str = "word", score_model: str | None = None, fn: str | None = None,
                    losses=(), weights=(), reduction: str = "mean") -> TaskLoss:
    """Any task loss by name. Bad names and options raise ValueError (UserError for custom/lm)."""
    key = str(name).lower()
    if key in METRIC_NAMES:
        return build_metric(key, level, tokenizer=tokenizer if key == "rouge" else None,
                            **({"rouge_key": rouge_key} if key == "rouge" else {}))
    if key == "repetition":
        return Repetition(level, n=n)
    if key == "seq_rep":
        return SeqRep(level, n=n)
    if key == "nontermination":
        return NonTermination(level)
    if key == "edit":
        return EditDistance(level, unit=unit)
    if key == "length":
        return LengthRatio(level, unit=unit)
    if key == "lm":
        return LMScore(level, score_model=score_model, reduction=reduction)
    if key == "custom":
        return Custom(level, fn=fn)
    if key == "composite":
        names, weights = list(losses), list(weights)
        if not names or len(names) != len(weights):
            raise ValueError(f"composite needs metric.losses and metric.weights of equal, non-zero length "
                             f"(got {len(names)} losses and {len(weights)} weights)")
        numbers = []
        for w in weights:
            try:
                numbers.append(float(w))
            except (TypeError, ValueError):
                raise ValueError(f"metric.weights holds {w!r}, not a number: give one number per loss") from None
            if not math.isfinite(numbers[-1]):
                raise ValueError(f"metric.weights holds {w!r}: give finite numbers")
        if "composite" in [str(x).lower() for x in names]:
            raise ValueError("a composite cannot contain another composite: list its losses directly")
        options = dict(tokenizer=tokenizer, rouge_key=rouge_key, n=n, unit=unit, score_model=score_model, fn=fn,
                       reduction=reduction)
        return Composite([build_task_loss(x, level, **options) for x in names], numbers, level)
    raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(LOSS_NAMES)}")


def require_sentence_form(loss: TaskLoss, rule: str) -> None:
    """PG and MRT score each output on its own: a corpus-only loss cannot be their reward."""
    if not loss.has_sentence_form:
        raise UserError(f"trainer={rule} needs a per-output (sentence) loss, and metric={loss.name} only has a "
                        f"corpus form: choose another metric.name, or trainer=mgs, which optimises corpus losses")


def _benchmark_edit(pairs: int = 320, repeats: int = 5) -> None:
    """rapidfuzz against the plain Python DP on word lists like the K+1 = 5 decodes of a 64-row batch."""
    import random
    import time

    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    data = [([rng.choice(words) for _ in range(rng.randint(8, 25))], [rng.choice(words) for _ in range(rng.randint(8, 25))])
            for _ in range(pairs)]
    for name, distance in (("python", levenshtein), ("rapidfuzz", Levenshtein.distance)):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for a, b in data:
                distance(a, b)
        print(f"{name:9s} {(time.perf_counter() - t0) / repeats * 1e3:8.2f} ms for {pairs} word-level pairs")


if __name__ == "__main__":
    _benchmark_edit()

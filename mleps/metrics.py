"""Task metrics the trainers optimise: BLEU and chrF (sacrebleu), ROUGE (rouge-score).

Each is a task loss (mleps.task_loss): `stats(decoded)` on a DecodedBatch scores its texts,
and the loss is 1 - score/100. The text interface below stays for direct use.

Every metric takes ``hyps: list[str]`` and ``refs: list[list[str]]`` (``refs[i]``
holds the references of ``hyps[i]``; counts may differ between examples) and
scores on a 0..100 scale. ``stats`` returns additive sufficient statistics:
sum the arrays of disjoint parts, then ``score_from_stats`` gives the score of
the whole. The scoring itself is the libraries'; this module only adapts the
data layout, guards the edge cases and keeps the scorer objects alive.

    metric = build_metric("bleu", level="corpus")
    metric.corpus_score(["the cat sat"], [["the cat sat", "a cat sat"]])

``python scripts/bench_metrics.py`` times ``stats`` on 64 sentences.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from nltk.stem import porter
from rouge_score import rouge_scorer
from rouge_score import tokenizers as rouge_tokenizers
from sacrebleu.metrics import BLEU, CHRF

from mleps.task_loss import TaskLoss, register_task_loss

METRIC_NAMES = ("bleu", "chrf", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_TOKENIZERS = ("default", "whitespace", "char")


# --------------------------------------------------------------------------- input checks


def _prepare(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Validate counts and normalise to ``list[str]`` / ``list[list[str]]`` with >= 1 reference each."""
    if len(hyps) != len(refs):
        # sacrebleu zips silently and can report 100 on misaligned data.
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} reference lists; they must match")
    hyps = ["" if h is None else str(h) for h in hyps]
    out = []
    for r in refs:
        # A bare string would be iterated character by character: treat it as one reference.
        r = [r] if isinstance(r, str) else list(r)
        # None and "" mean "no reference here" (padding); sacrebleu would count "" as a
        # zero-length reference and let it pick the brevity penalty's reference length.
        r = [x for x in r if x]
        # No reference at all: score against "" so the example counts and scores 0.
        out.append(r or [""])
    return hyps, out


def reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's reference streams.

    Missing references are ``None``, which sacrebleu 2.x drops per segment
    (``Metric._cache_references``), so reference counts may vary.
    """
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


# --------------------------------------------------------------------------- base class


class Metric(TaskLoss):
    """Common interface; subclasses implement the ``_``-prefixed corpus/sentence hooks."""

    name: str = ""
    higher_is_better = True  # score_from_stats is the metric's 0..100 score

    # Hooks on prepared input (see _prepare).
    def _corpus_stats(self, hyps: list[str], refs: list[list[str]]) -> np.ndarray:
        raise NotImplementedError

    def _corpus_from_stats(self, stats: np.ndarray) -> float:
        raise NotImplementedError

    def _corpus_details(self, hyps: list[str], refs: list[list[str]]) -> dict:
        raise NotImplementedError

    def _sentence_scores(self, hyps: list[str], refs: list[list[str]]) -> list[float]:
        raise NotImplementedError

    # Public API.
    def corpus_score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
        """Corpus-level score (whatever ``level``): ``{"score": 0..100, <metric fields>}``."""
        return self._corpus_details(*_prepare(hyps, refs))

    def sentence_scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
        """One smoothed 0..100 score per hypothesis."""
        return self._sentence_scores(*_prepare(hyps, refs))

    def stats(self, decoded) -> np.ndarray:
        """The task-loss contract: the statistics of a DecodedBatch's texts against its references."""
        return self.text_stats(decoded.texts, decoded.references)

    def text_stats(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """Additive sufficient statistics of ``score`` at this metric's level, of ``(hyps, refs)``."""
        hyps, refs = _prepare(hyps, refs)
        if self.level == "sentence":
            scores = self._sentence_scores(hyps, refs)
            return np.array([float(sum(scores)), float(len(scores))])
        return self._corpus_stats(hyps, refs)

    def score_from_stats(self, stats: np.ndarray) -> float:
        """Score (0..100) from (summed) ``stats``."""
        stats = np.asarray(stats)
        if self.level == "sentence":
            return float(stats[0] / stats[1]) if stats[1] else 0.0
        return self._corpus_from_stats(stats)

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        """Corpus score, or mean sentence score when ``level == "sentence"``."""
        return self.score_from_stats(self.text_stats(hyps, refs))

    def task_loss(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        """``1 - score/100`` in [0, 1]; what the trainers minimise."""
        return self.task_loss_from_stats(self.text_stats(hyps, refs))

    def task_loss_from_stats(self, stats: np.ndarray) -> float:
        """``task_loss`` from (summed) ``stats``: how processes that score shards agree on one loss."""
        # Clip: exp-of-mean-log BLEU can land a rounding error above 100.
        return min(1.0, max(0.0, 1.0 - self.score_from_stats(stats) / 100.0))

    # The task-loss contract (mleps.task_loss).
    loss_from_stats = task_loss_from_stats

    def report(self, stats, hyps, references) -> dict:
        """The library's own corpus details (BLEU's signature, bp, ...) from the gathered texts."""
        return self.corpus_score(hyps, references)

    def sentence_losses(self, decoded) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - s / 100.0)) for s in self.sentence_scores(decoded.texts, decoded.references)]

    @property
    def num_stats(self) -> int:
        return 2 if self.level == "sentence" else self._n_stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r})"


# --------------------------------------------------------------------------- sacrebleu metrics


class SacrebleuPrivate:
    """The only calls into sacrebleu's private API: per-segment statistics, and chrF's reduction
    (BLEU's uses the public ``BLEU.compute_bleu``). tests/test_metrics.py pins both against
    sacrebleu's public functions, so an upstream change fails there first."""

    @staticmethod
    def segment_stats(obj, hyps: list[str], ref_streams: list[list[str | None]]) -> list[list[int]]:
        return obj._extract_corpus_statistics(hyps, ref_streams)

    @staticmethod
    def score_from_stats(obj, stats: list):
        return obj._compute_score_from_stats(stats)


def _sacre_score_from_stats(obj, stats: list):
    """A sacrebleu Score object from summed segment statistics."""
    if isinstance(obj, BLEU):
        order = obj.max_ngram_order
        return BLEU.compute_bleu(correct=stats[2:2 + order], total=stats[2 + order:], sys_len=int(stats[0]),
                                 ref_len=int(stats[1]), smooth_method=obj.smooth_method, smooth_value=obj.smooth_value,
                                 effective_order=obj.effective_order, max_ngram_order=order)
    return SacrebleuPrivate.score_from_stats(obj, stats)


class _SacreMetric(Metric):
    """Shared plumbing for sacrebleu metrics, which all expose per-segment statistics."""

    # The sacrebleu objects used for corpus and for sentence scores (may be the same).
    _corpus_obj: BLEU | CHRF
    _sentence_obj: BLEU | CHRF
    _n_stats: int

    def _segment_stats(self, obj, hyps: list[str], refs: list[list[str]]) -> np.ndarray:
        """(n, k) per-segment statistics, best over each segment's references."""
        if not hyps:
            obj.num_refs = 0  # so get_signature() works on an empty corpus
            return np.zeros((0, self._n_stats), dtype=np.int64)
        return np.asarray(SacrebleuPrivate.segment_stats(obj, hyps, reference_streams(refs)), dtype=np.int64)

    def _corpus_stats(self, hyps, refs):
        return self._segment_stats(self._corpus_obj, hyps, refs).sum(axis=0)

    def _corpus_from_stats(self, stats):
        return float(_sacre_score_from_stats(self._corpus_obj, stats.astype(np.int64).tolist()).score)

    def _sentence_scores(self, hyps, refs):
        # Same numbers as sacrebleu.sentence_*: each row is that segment's statistics.
        seg = self._segment_stats(self._sentence_obj, hyps, refs)
        return [float(_sacre_score_from_stats(self._sentence_obj, row.tolist()).score) for row in seg]

    def _sacre_score(self, hyps, refs):
        """(sacrebleu Score object, signature string) for the corpus."""
        total = self._corpus_stats(hyps, refs)
        return _sacre_score_from_stats(self._corpus_obj, total.tolist()), str(self._corpus_obj.get_signature())


@register_task_loss
class BleuMetric(_SacreMetric):
    """sacreBLEU: 13a tokeniser, exp smoothing; sentence level uses effective order like ``sentence_bleu``."""

    name = "bleu"

    def __init__(self, level: str = "corpus", tokenizer: str | None = None):
        super().__init__(level)
        tokenize = tokenizer or BLEU.TOKENIZER_DEFAULT
        if tokenize not in BLEU.TOKENIZERS:
            raise ValueError(f"unknown BLEU tokenizer {tokenize!r}; choose one of: {', '.join(BLEU.TOKENIZERS)}")
        # Defaults of sacrebleu.corpus_bleu and sacrebleu.sentence_bleu respectively.
        self._corpus_obj = BLEU(tokenize=tokenize)
        self._sentence_obj = BLEU(tokenize=tokenize, effective_order=True)
        self._n_stats = 2 + 2 * self._corpus_obj.max_ngram_order

    def _corpus_details(self, hyps, refs):
        s, signature = self._sacre_score(hyps, refs)
        return {
            "score": float(s.score),
            "bleu": float(s.score),
            "signature": signature,
            "bp": float(s.bp),
            "precisions": [float(p) for p in s.precisions],
            "sys_len": int(s.sys_len),
            "ref_len": int(s.ref_len),
        }


@register_task_loss
class ChrfMetric(_SacreMetric):
    """sacreBLEU chrF (char order 6, beta 2); character-based, so no tokenizer."""

    name = "chrf"

    def __init__(self, level: str = "corpus", tokenizer: None = None):
        super().__init__(level)
        if tokenizer is not None:
            raise ValueError(f"chrF works on characters and takes no tokenizer (got {tokenizer!r}); pass tokenizer=None")
        self._corpus_obj = self._sentence_obj = CHRF()
        self._n_stats = 3 * self._corpus_obj.order

    def _corpus_details(self, hyps, refs):
        s, signature = self._sacre_score(hyps, refs)
        return {"score": float(s.score), "chrf": float(s.score), "signature": signature}


# --------------------------------------------------------------------------- ROUGE


class WhitespaceTokenizer(rouge_tokenizers.Tokenizer):
    """Lowercased runs of Unicode word characters, any script (rouge-score's default keeps only a-z0-9)."""

    _WORD = re.compile(r"\w+")
    _ASCII_WORD = re.compile(r"[a-z0-9]+")

    def __init__(self, use_stemmer: bool = True):
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = self._WORD.findall(text.lower())
        if self._stemmer is None:
            return tokens
        # Stem like rouge-score does: only ASCII words longer than 3 characters.
        return [
            self._stemmer.stem(t) if len(t) > 3 and self._ASCII_WORD.fullmatch(t) else t for t in tokens
        ]


class CharTokenizer(rouge_tokenizers.Tokenizer):
    """Every word character is a token: for scripts written without spaces (Chinese, Japanese, Thai)."""

    _CHAR = re.compile(r"\w")

    def tokenize(self, text: str) -> list[str]:
        return self._CHAR.findall(text.lower())


class _CachedTokenizer(rouge_tokenizers.Tokenizer):
    """Memoises another tokenizer: Porter stemming dominates ROUGE's cost, and the same
    references (and each hypothesis, once per reference) are tokenized over and over."""

    def __init__(self, inner, maxsize: int = 2**16):
        self.inner = inner
        self._cached = functools.lru_cache(maxsize=maxsize)(lambda text: tuple(inner.tokenize(text)))

    def tokenize(self, text: str) -> list[str]:
        return list(self._cached(text))


def make_rouge_tokenizer(tokenizer=None, use_stemmer: bool = True):
    """``None``/"default" | "whitespace" | "char" | any object with ``tokenize(text) -> list[str]``."""
    if tokenizer is None or tokenizer == "default":
        inner = rouge_tokenizers.DefaultTokenizer(use_stemmer)
    elif tokenizer == "whitespace":
        inner = WhitespaceTokenizer(use_stemmer)
    elif tokenizer == "char":
        inner = CharTokenizer()
    elif hasattr(tokenizer, "tokenize") and not isinstance(tokenizer, str):
        inner = tokenizer
    else:
        raise ValueError(
            f"unknown ROUGE tokenizer {tokenizer!r}; choose one of: {', '.join(ROUGE_TOKENIZERS)} "
            "or an object with a tokenize(text) method"
        )
    return _CachedTokenizer(inner)


@dataclass
class RougeOptions:
    rouge_tokenizer: str = "default"  # rouge: default | whitespace | char (default drops non-Latin text)
    rouge_key: str = "rougeL"  # rouge: rouge1 | rouge2 | rougeL, the score trained on and selected by


@register_task_loss
class RougeMetric(Metric):
    """rouge-score F1 (x100) with Porter stemming; best reference per ROUGE type;
    the corpus score is the mean of sentence scores of ``rouge_key``."""

    name, options = "rouge", RougeOptions
    _n_stats = 2  # [sum of F1, count]

    @classmethod
    def from_options(cls, level: str, options: dict) -> "RougeMetric":
        return cls(level, tokenizer=options.get("rouge_tokenizer"), rouge_key=options.get("rouge_key", "rougeL"))

    def __init__(self, level: str = "corpus", tokenizer=None, rouge_key: str = "rougeL", use_stemmer: bool = True):
        super().__init__(level)
        if rouge_key not in ROUGE_TYPES:
            raise ValueError(f"unknown rouge_key {rouge_key!r}; choose one of: {', '.join(ROUGE_TYPES)}")
        self.rouge_key = rouge_key
        self.tokenizer = make_rouge_tokenizer(tokenizer, use_stemmer)
        # Training only needs rouge_key; LCS is the costly part, so don't compute the others then.
        self._all = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=self.tokenizer)
        self._key = rouge_scorer.RougeScorer([rouge_key], tokenizer=self.tokenizer)

    @staticmethod
    def _f(scorer, hyp: str, refs: list[str], rouge_type: str) -> float:
        # score_multi keeps, per ROUGE type, the reference with the highest F.
        return 100.0 * scorer.score_multi(refs, hyp)[rouge_type].fmeasure

    def _sentence_scores(self, hyps, refs):
        return [self._f(self._key, h, r, self.rouge_key) for h, r in zip(hyps, refs)]

    def _corpus_stats(self, hyps, refs):
        scores = self._sentence_scores(hyps, refs)
        return np.array([float(sum(scores)), float(len(scores))])

    def _corpus_from_stats(self, stats):
        return float(stats[0] / stats[1]) if stats[1] else 0.0

    def _corpus_details(self, hyps, refs):
        sums = dict.fromkeys(ROUGE_TYPES, 0.0)
        for h, r in zip(hyps, refs):
            best = self._all.score_multi(r, h)
            for k in ROUGE_TYPES:
                sums[k] += 100.0 * best[k].fmeasure
        out = {k: (v / len(hyps) if hyps else 0.0) for k, v in sums.items()}
        return {"score": out[self.rouge_key], **out}

    def __repr__(self) -> str:
        return f"RougeMetric(level={self.level!r}, rouge_key={self.rouge_key!r})"


# --------------------------------------------------------------------------- factory

_METRICS = {"bleu": BleuMetric, "chrf": ChrfMetric, "rouge": RougeMetric}


def build_metric(name: str = "bleu", level: str = "corpus", tokenizer=None, **kwargs) -> Metric:
    """Build a metric once and reuse it. ``tokenizer``: ROUGE ("default"|"whitespace"|"char"|object)
    or BLEU (a sacrebleu tokenizer name, default "13a"); chrF takes none. ``kwargs``: ROUGE's
    ``rouge_key`` and ``use_stemmer``."""
    key = str(name).lower()
    if key not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(METRIC_NAMES)}")
    return _METRICS[key](level=level, tokenizer=tokenizer, **kwargs)

"""Timings of the task losses' scoring: python scripts/bench_metrics.py

  metrics  `text_stats` of BLEU, chrF and ROUGE on 64 synthetic sentence pairs, per level (cold = first call)
  edit     rapidfuzz's Levenshtein against the plain Python DP (mleps.losses.levenshtein) on word lists
"""
from __future__ import annotations

import random
import time

from rapidfuzz.distance import Levenshtein

from mleps.losses import levenshtein
from mleps.metrics import METRIC_NAMES, build_metric
from mleps.task_loss import LEVELS


def bench_metrics(n: int = 64, repeats: int = 20) -> None:
    """Print the time of ``stats`` for n synthetic sentence pairs (cold = first call, warm = repeated)."""
    rng = random.Random(0)
    vocab = [f"{w}{s}" for w in ("run", "walk", "house", "model", "train", "score", "word", "talk")
             for s in ("", "s", "ing", "ed", "er")]

    def sent() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(15, 30))) + " ."

    hyps = [sent() for _ in range(n)]
    refs = [[sent()] for _ in range(n)]
    for name in METRIC_NAMES:
        for level in LEVELS:
            m = build_metric(name, level)
            t0 = time.perf_counter()
            m.text_stats(hyps, refs)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(repeats):
                m.text_stats(hyps, refs)
            warm = (time.perf_counter() - t0) / repeats
            print(f"{name:5s} {level:8s} stats({n} sentences): cold {cold * 1e3:7.2f} ms  warm {warm * 1e3:7.2f} ms")


def bench_edit(pairs: int = 320, repeats: int = 5) -> None:
    """rapidfuzz against the plain Python DP on word lists like the K+1 = 5 decodes of a 64-row batch."""
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
    bench_metrics()
    bench_edit()

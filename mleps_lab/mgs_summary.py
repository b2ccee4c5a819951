"""What an MGS run's metrics.jsonl says about its importance weights: one summary per run.

Used by scripts/mgs_report.py (one run, one screen) and scripts/screen_mgs.py (a table of runs).
Only the main phase counts (a warm start is MLE). Training events are means over
`trainer.log_every` steps; the summary averages the events, so set log_every=1 for per-step means.

    start / final / best   validation score of the main phase (higher is better for BLEU, chrF, ROUGE)
    ess_share              ESS / number of samples: 1 = uniform weights, 1/K = one sample has them all
    guided_weight          weight on the guided samples (line-search ones included); 0.5 = the prior with λ = 0.5
    spread                 std of C(θ+Δ_k) - C(θ) over the samples, training batch
    rank_corr              Spearman correlation of the samples' losses, training batch vs held-out batch
                           (trainer.diagnose_every); near 0: the weights rank noise
    taken_minus_blind      held-out task loss after the step taken minus after the blind (uniform-weight)
                           step from the same θ; negative: the weights helped
    s_per_step             training seconds per step, the diagnostic's own time excluded
"""
from __future__ import annotations

import math

COLUMNS = ("steps", "start", "final", "best", "ess_share", "guided_weight", "spread", "rank_corr",
           "taken_minus_blind", "s_per_step")


def mean_of(values) -> float | None:
    """The mean of the finite values (None and NaN skipped); None when there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def main_steps(events: list[dict]) -> list[dict]:
    """The logged training steps of the main phase (a warm start is MLE; events such as resume are not steps)."""
    return [e for e in events if e.get("split") == "train" and e.get("phase") == "main" and "event" not in e]


def summarise(events: list[dict], higher_is_better: bool = True) -> dict:
    """The COLUMNS of one run (None where the run did not log the statistic)."""
    train = main_steps(events)
    validation = [e for e in events if e.get("split") == "validation" and e.get("phase") == "main"]
    scores = [e["score"] for e in validation]
    best = (max if higher_is_better else min)(scores) if scores else None
    return {
        "steps": max((e["step"] for e in train), default=0) - (validation[0]["step"] if validation else 0),
        "start": scores[0] if scores else None,
        "final": scores[-1] if scores else None,
        "best": best,
        "ess_share": mean_of(e.get("ess_share") for e in train),
        "guided_weight": mean_of(e.get("guided_weight") for e in train),
        "spread": mean_of(e.get("loss_spread_std") for e in train),
        "rank_corr": mean_of(e.get("diag_rank_correlation") for e in train),
        "taken_minus_blind": mean_of(e.get("diag_taken_minus_blind") for e in train),
        "s_per_step": mean_of(e["step_s"] - e.get("diagnose_s", 0.0) for e in train if "step_s" in e),
    }


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.4g}"


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)

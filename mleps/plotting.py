"""Validation metric against step and against training wall time, from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from mleps.rundir import read_events


def plot_run(metrics_file: Path, out: Path, runs: dict[str, Path] | None = None) -> Path | None:
    """One PNG with two panels. `runs` (label -> metrics.jsonl) overlays several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs or {"": metrics_file}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    metric = "score"
    plotted = False
    for label, path in runs.items():
        events = read_events(path, "validation")
        if not events:
            continue
        plotted = True
        metric = events[0].get("metric", metric)
        steps = [e["step"] for e in events]
        times = [e["train_s"] / 60 for e in events]
        scores = [e["score"] for e in events]
        by_step.plot(steps, scores, marker="o", ms=3, label=label or None)
        by_time.plot(times, scores, marker="o", ms=3, label=label or None)
        warm = [e for e in events if e.get("phase") == "warm_start"]
        if not label and warm and len(warm) < len(events):  # the warm start ends where MGS begins
            by_step.axvline(warm[-1]["step"], color="gray", ls="--", lw=1)
            by_time.axvline(warm[-1]["train_s"] / 60, color="gray", ls="--", lw=1)
    if not plotted:
        plt.close(fig)
        return None
    by_step.set_xlabel("step")
    by_time.set_xlabel("training wall time (min)")
    for ax in (by_step, by_time):
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

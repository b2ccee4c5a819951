"""How well a training batch ranks MGS's samples, from runs made with trainer.oracle_rows.

    python scripts/weight_signal.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

Every step of such a run scored the same K samples on the training batch and on the held-out rows
(`oracle_rank_correlation`, the Spearman correlation of the two rankings; NaN when either side
ties). Per run and pooled over all runs this prints: the steps with a defined correlation, its
mean, the share of those steps above zero and at 0.7 or more, and the mean gain of the held-out
best sample over θ (`oracle_best_improvement`, in task-loss units: 0.01 = one BLEU point).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mleps_lab.mgs_summary import main_steps, markdown_table, mean_of
from mleps.rundir import read_events

COLUMNS = ("run", "steps", "rank_corr_mean", "share_above_0", "share_at_0.7", "heldout_best_gain", "ess_share")


def summarise(name: str, steps: list[dict]) -> dict:
    corr = [e["oracle_rank_correlation"] for e in steps
            if "oracle_rank_correlation" in e and math.isfinite(e["oracle_rank_correlation"])]
    return {"run": name, "steps": len(corr), "rank_corr_mean": mean_of(corr),
            "share_above_0": mean_of(c > 0 for c in corr), "share_at_0.7": mean_of(c >= 0.7 for c in corr),
            "heldout_best_gain": mean_of(e.get("oracle_best_improvement") for e in steps),
            "ess_share": mean_of(e.get("ess_share") for e in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="write the rows here as well")
    args = parser.parse_args()
    rows, pooled = [], []
    for run in args.run_dirs:
        if not (run / "metrics.jsonl").is_file():
            sys.exit(f"error: no metrics.jsonl in {run}")
        steps = main_steps(read_events(run))
        if not any("oracle_task_loss" in e for e in steps):
            sys.exit(f"error: {run} logged no oracle statistics: it was not run with trainer.oracle_rows")
        rows.append(summarise(str(run), steps))
        pooled += steps
    rows.append(summarise("all", pooled))
    print(markdown_table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

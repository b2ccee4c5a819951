"""One screen on an MGS run's importance weights, from its metrics.jsonl.

    python scripts/mgs_report.py RUN_DIR [--rows 15]

Prints the run's summary (mleps_lab/mgs_summary.py says what each column measures), then up to
--rows logged training steps of the main phase, evenly spaced, with the validation score
of the nearest evaluation at or before each. The diagnostic columns (rank_corr,
taken−blind) need trainer.diagnose_every, the oracle ones trainer.oracle_rows; columns a run did not
log are left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mleps_lab.mgs_summary import COLUMNS, format_value, main_steps, markdown_table, summarise
from mleps.rundir import read_events

STEP_COLUMNS = {"step": "step", "task_loss": "task_loss", "ess_share": "ess_share", "guided_weight": "guided",
                "loss_spread_std": "spread", "temperature": "alpha", "diag_rank_correlation": "rank_corr",
                "diag_taken_minus_blind": "taken-blind", "oracle_rank_correlation": "oracle_rank_corr",
                "oracle_best_improvement": "oracle_best", "update_norm": "update_norm", "step_s": "s/step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=15, help="at most this many training steps")
    parser.add_argument("--lower-is-better", action="store_true", help="the validation metric is a loss")
    args = parser.parse_args()
    path = args.run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: no metrics.jsonl in {args.run_dir}")
    events = read_events(path)
    print(f"{args.run_dir}  (main phase)")
    print(markdown_table([summarise(events, not args.lower_is_better)], COLUMNS))
    train = main_steps(events)
    if not train:
        print("\nno main-phase training steps logged")
        return
    validation = [e for e in events if e.get("split") == "validation" and e.get("phase") == "main"]
    stride = max(1, -(-len(train) // args.rows))
    picked = train[::stride]
    if picked[-1] is not train[-1]:
        picked.append(train[-1])
    keys = [k for k in STEP_COLUMNS if any(k in e for e in picked)]
    print()
    print("| " + " | ".join([STEP_COLUMNS[k] for k in keys] + ["val"]) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for event in picked:
        before = [v["score"] for v in validation if v["step"] <= event["step"]]
        cells = [format_value(event.get(k)) for k in keys] + [format_value(before[-1] if before else None)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Reproduce the paper's comparisons in one resumable command.

    python scripts/reproduce.py mt                      # the MT comparison, CPU budget (target 100 min; the report times each stage)
    python scripts/reproduce.py mt --budget tiny --out /tmp/r   # the pipeline in ~2 minutes
    python scripts/reproduce.py summarization           # AESLC, ROUGE-L, a smaller budget
    python scripts/reproduce.py scratch                 # MLE, PG and MGS from random weights

Killed, it resumes at the first unfinished run when called again with the same arguments.
Stages and design: mleps_lab/reproduce.py. Writes docs/results.md (mt; other tasks
docs/results-<task>.md), plots in docs/img/ and the numbers in docs/results/<task>.json + .csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mleps_lab.reproduce import main  # noqa: E402

if __name__ == "__main__":
    main()

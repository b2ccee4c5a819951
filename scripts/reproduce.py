"""Reproduce the paper's comparisons in one resumable command: python scripts/reproduce.py mt|summarization|scratch|...

The same as `python -m mleps_lab.reproduce`: its USAGE (and --help) lists the commands, and the module
docstring the stages.
"""
from __future__ import annotations

from mleps_lab.reproduce import main

if __name__ == "__main__":
    main()

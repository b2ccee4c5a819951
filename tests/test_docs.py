"""Docs speak to users: no references to a private issue tracker ("issue #25", "(#13)") in the README, the
docs, the lab's notes or the code's comments. A public project's reference (huggingface/trl#3516) names its
repository and stays."""
from __future__ import annotations

import re

from conftest import REPO

TRACKER_NUMBER = re.compile(r"(?<![\w/&])#\d{1,4}\b|\b[Ii]ssues? \d+\b")


def test_no_tracker_numbers_in_docs_or_comments():
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for folder, patterns in (("docs", ("*.md",)), ("mleps", ("*.py", "*.yaml")), ("mleps_lab", ("*.py", "*.md")),
                             ("scripts", ("*.py",)), ("tests", ("*.py",))):
        files += [f for pattern in patterns for f in sorted((REPO / folder).rglob(pattern))]
    found = [f"{f.relative_to(REPO)}:{n}: {line.strip()}" for f in files if f.name != "test_docs.py"
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if TRACKER_NUMBER.search(line)]
    assert not found, "\n".join(found)

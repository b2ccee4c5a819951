"""Share of outputs that contain a banned word: a control task for the rules that read the task loss.

Token cross-entropy on references that use the word freely pulls the other way, so a rule can only lower
this loss by reading it; an empty output avoids the word too, so the guard metric (BLEU) shows what a
rule paid for it (docs/mgs.md, the steering benchmark).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mleps.task_loss import TaskLoss, register_task_loss


@dataclass
class BannedOptions:
    word: str = "a"  # banned: the word (case-insensitive, whole words only)


@register_task_loss
class BannedWord(TaskLoss):
    """1 for an output containing `word` as a whole word (any case), else 0; corpus: the share of outputs."""

    name, options = "banned", BannedOptions

    def __init__(self, level: str = "corpus", word: str = "a"):
        super().__init__(level)
        word = str(word).strip()
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"banned word {word!r} must be one word without spaces (e.g. metric.word=a)")
        self.word = word
        self._pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)

    def sentence_losses(self, decoded):
        return [1.0 if self._pattern.search(text) else 0.0 for text in decoded.texts]

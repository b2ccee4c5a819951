"""NLL of the outputs under a frozen score model (per token, or of the whole sequence: MGS-LM)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mleps.choice import Choice
from mleps.errors import UserError
from mleps.task_loss import TaskLoss, register_task_loss


class Reduction(Choice):
    mean = "mean"  # NLL per token
    sum = "sum"  # NLL of the whole sequence (MGS-LM)


REDUCTIONS = tuple(m.value for m in Reduction)


@dataclass
class LMOptions:
    score_model: Optional[str] = None  # lm: a checkpoint folder; null = a frozen copy of the model at the start
    reduction: Reduction = Reduction.mean  # lm: mean (NLL per token) | sum (NLL of the whole sequence, MGS-LM's loss)


@register_task_loss
class LMScore(TaskLoss):
    """NLL of the outputs (through EOS) given their sources under a frozen score model: a copy of the
    run's model taken by `bind` (the reference implementation's choice), or the checkpoint at
    `score_model`. reduction=mean: per token; reduction=sum: of the whole sequence, a decoder-only
    model's prompt included (the reference's MGS-LM loss: a looping, non-terminating output costs the
    NLL of every token it adds). No-grad teacher-forced forwards, a bounded number of tokens at a time."""

    name, options = "lm", LMOptions

    def __init__(self, level: str = "corpus", score_model: str | None = None, reduction: str = "mean",
                 tokens_per_forward: int = 16_384):
        super().__init__(level)
        self.tokens_per_forward = tokens_per_forward  # rows x width per forward: bounds the [rows, width, vocab] logits
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown lm reduction {reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.score_model_path = score_model
        if score_model and not Path(score_model).expanduser().is_dir():
            raise UserError(f"metric.score_model={score_model} is not a folder: pass a checkpoint folder "
                            f"(e.g. RUN/checkpoints/best), or null for a frozen copy of the model at the start")
        self.model, self.eos = None, None

    @property
    def needs_start_model(self) -> bool:
        return not self.score_model_path

    def bind(self, model, tokenizer) -> None:
        from mleps.decoding import eos_ids
        from mleps.models import load_checkpoint

        if self.score_model_path:
            scorer = load_checkpoint(str(Path(self.score_model_path).expanduser()))[0]
            if scorer.config.vocab_size != model.config.vocab_size:
                raise UserError(f"metric.score_model={self.score_model_path} has a vocabulary of "
                                f"{scorer.config.vocab_size}, the model {model.config.vocab_size}: use a score "
                                f"model trained with the same tokenizer")
        else:
            scorer = copy.deepcopy(model)
        self.model = scorer.to(next(model.parameters()).device).eval().requires_grad_(False)
        self.eos = eos_ids(model)

    def _nll(self, decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL summed over each output's tokens, plus its prompt's with reduction=sum; token counts)."""
        from mleps.families import family_for, sequence_log_probs

        if self.model is None:
            raise RuntimeError("metric=lm needs a score model: call bind(model, tokenizer) first")
        if decoded.ids is None or decoded.encoder_inputs is None:
            raise ValueError("metric=lm needs the decoded ids and the encoded sources (decoded_batch(..., batch=))")
        family, device = family_for(self.model), self.model.device
        # a row's labels never run past its own generated tokens (EOS included when it has one)
        lengths = torch.tensor([1 + len(t) + e for t, e in zip(decoded.token_ids, decoded.ended_with_eos)])
        rows_per_forward = max(1, self.tokens_per_forward // max(decoded.ids.shape[1], 1))
        nll, tokens = [], []
        with torch.no_grad():
            for start in range(0, len(decoded), rows_per_forward):
                rows = slice(start, start + rows_per_forward)
                inputs = {k: v[rows].to(device) for k, v in decoded.encoder_inputs.items()}
                ids = decoded.ids[rows].to(device)
                log_probs, counts = sequence_log_probs(self.model, inputs, ids, torch.arange(len(ids), device=device),
                                                       self.eos, lengths[rows].to(device))
                if self.reduction == "sum":
                    log_probs = log_probs - family.prompt_nll(self.model, inputs)
                nll.append(-log_probs.double().cpu())
                tokens.append(counts.double().cpu())
        return torch.cat(nll), torch.cat(tokens)

    def sentence_losses(self, decoded):
        return self._sentence(*self._nll(decoded))

    def corpus_stats(self, decoded):
        return self._corpus(*self._nll(decoded))

    def stats_and_sentence_losses(self, decoded):  # one scoring forward for both
        nll, tokens = self._nll(decoded)
        losses = self._sentence(nll, tokens)
        stats = np.array([float(sum(losses)), float(len(losses))]) if self.level == "sentence" else \
            self._corpus(nll, tokens)
        return stats, losses

    def _sentence(self, nll, tokens) -> list[float]:
        return (nll if self.reduction == "sum" else nll / tokens.clamp(min=1)).tolist()

    def _corpus(self, nll, tokens) -> np.ndarray:
        return np.array([float(nll.sum()), float(len(nll) if self.reduction == "sum" else tokens.sum())])

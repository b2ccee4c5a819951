"""Datasets: load a split with `datasets`, check it, tokenise it with `map`, batch it.

Every split becomes three columns: `source` (str), `target` (str, the training label) and
`references` (list[str]: the target plus any `data.reference_columns`, for evaluation).
Training batches are a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would have seen, without replaying the data loader.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from hydra.utils import to_absolute_path

from mleps.errors import UserError

log = logging.getLogger(__name__)
datasets.disable_progress_bars()

SPLITS = ("train", "validation", "test")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def data_path(path: str) -> Path:
    """Relative paths are relative to where the command was started (not Hydra's run dir)."""
    try:
        return Path(to_absolute_path(path))
    except ValueError:  # outside a Hydra app
        return Path(path).absolute()


def load_split(data_cfg, split: str) -> datasets.Dataset:
    """Load, validate and normalise one split to columns source/target/references."""
    file = getattr(data_cfg, f"{split}_file", None) if split in SPLITS else None
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if not file:
        raise UserError(f"data.{split}_file is not set for data={data_cfg.name}: set data.{split}_file=PATH")
    path = data_path(file)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run `make data`, or set data_dir=... or MLEPS_DATA_DIR)")
    if path.stat().st_size == 0:
        raise UserError(f"data file is empty: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"unsupported data file type '{path.suffix}' for {path}: use .jsonl, .json, .csv or .tsv")
    _check_utf8(path)

    kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
    try:
        raw = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise UserError(f"could not parse {path} as {path.suffix[1:].upper()}: {str(e).splitlines()[0][:200]}") from None
    if len(raw) == 0:
        raise UserError(f"data file has no rows: {path}")

    # Extra references are for evaluation; training splits need not have them (AESLC's train has none).
    extra = list(data_cfg.reference_columns) if split != "train" else []
    columns = [data_cfg.source_column, data_cfg.target_column, *extra]
    for col in columns:
        if col not in raw.column_names:
            raise UserError(
                f"column '{col}' not found in {path}; it has: {', '.join(raw.column_names)} "
                f"(set data.source_column / data.target_column / data.reference_columns)"
            )

    for col in (data_cfg.source_column, data_cfg.target_column):  # str() of a list would train on "['a', 'b']"
        if not isinstance(raw.features[col], datasets.Value):
            raise UserError(f"column '{col}' of {path} holds lists or objects, not text: point "
                            f"data.source_column / data.target_column at a text column")

    def normalise(row):
        source = _text(row[data_cfg.source_column])
        target = _text(row[data_cfg.target_column])
        refs = [target] if target else []
        for col in extra:
            value = row[col]
            refs += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
        return {"source": source, "target": target, "references": [r for r in refs if r]}

    ds = raw.map(normalise, remove_columns=raw.column_names, desc=f"normalise {split}")
    # Training needs a target; evaluation needs at least one reference.
    keep = (lambda r: bool(r["source"]) and bool(r["target"])) if split == "train" else (
        lambda r: bool(r["source"]) and bool(r["references"]))
    kept = ds.filter(keep)
    if len(kept) < len(ds):
        log.warning("%s: skipped %d of %d rows with an empty source or target", path.name, len(ds) - len(kept), len(ds))
    if len(kept) == 0:
        raise UserError(f"every row of {path} has an empty source or target")
    limit = data_cfg.max_train_examples if split == "train" else data_cfg.max_eval_examples
    if limit is not None and limit < len(kept):
        kept = kept.select(range(limit))
    return kept


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Fail with the byte offset instead of a decoder traceback deep inside pyarrow."""
    offset = 0
    decoder = __import__("codecs").getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 (byte {offset + e.start}): re-encode it as UTF-8") from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not valid UTF-8 (it ends inside a multi-byte character): "
                            f"re-encode it as UTF-8") from None


def tokenize(ds: datasets.Dataset, tokenizer, data_cfg, source_prefix: str = "") -> datasets.Dataset:
    """Token ids for source and target, truncated to the configured lengths (and counted)."""
    max_src, max_tgt = data_cfg.max_source_length, data_cfg.max_target_length

    def fn(batch):
        src = tokenizer([source_prefix + s for s in batch["source"]])["input_ids"]
        tgt = tokenizer(text_target=batch["target"])["input_ids"]
        return {
            "input_ids": [_truncate(ids, max_src) for ids in src],
            "labels": [_truncate(ids, max_tgt) for ids in tgt],
            "truncated": [len(s) > max_src or len(t) > max_tgt for s, t in zip(src, tgt)],
        }

    out = ds.map(fn, batched=True, desc="tokenise")
    n_truncated = sum(out["truncated"])
    if n_truncated:
        log.warning("truncated %d of %d examples to %d source / %d target tokens", n_truncated, len(out), max_src, max_tgt)
    return out


def _truncate(ids: list[int], limit: int) -> list[int]:
    # Keep the closing special token (</s>) so a truncated example still ends like the others.
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


@dataclass
class BatchStream:
    """Training batches as a pure function of the step: epoch-wise permutations seeded by (seed, epoch).

    The global batch of a step holds batch_size x world_size x accumulation rows, cut into
    world_size x accumulation micro-batches: micro-batch j takes rows [j::count]. Process r
    owns micro-batches r*accumulation .. r*accumulation + accumulation - 1. So the global
    batch, and each micro-batch, are the same whatever the split between processes and
    accumulation: 2 processes x 8 rows see the 16 rows 1 process x 16 rows sees, in the
    micro-batches 1 process x 8 rows x 2 accumulation steps sees.
    """

    dataset: datasets.Dataset
    batch_size: int  # per process and micro-batch
    seed: int
    rank: int = 0
    world_size: int = 1
    accumulation: int = 1

    def __post_init__(self):
        self.count = self.world_size * self.accumulation  # micro-batches per step
        self.global_batch = self.batch_size * self.count
        if self.global_batch > len(self.dataset):
            raise UserError(
                f"a global batch of {self.global_batch} (batch_size {self.batch_size} x {self.world_size} processes x "
                f"{self.accumulation} accumulation steps) is larger than the training set ({len(self.dataset)} "
                f"examples): lower trainer.batch_size or raise data.max_train_examples"
            )
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        start = step * self.global_batch
        return [int(self._perm(pos // n)[pos % n]) for pos in range(start, start + self.global_batch)]

    def micro_batches(self, step: int, everyone: bool = False) -> list[tuple[int, list[int]]]:
        """(micro-batch index j, row indices) of this process's micro-batches, or all of them."""
        rows = self.global_indices(step)
        return [(j, rows[j::self.count]) for j in range(self.count) if everyone or self.owns(j)]

    def owns(self, j: int) -> bool:
        """Whether micro-batch j is this process's."""
        return j // self.accumulation == self.rank

    def indices(self, step: int) -> list[int]:
        """This process's rows of the step (all its micro-batches)."""
        return [i for _, rows in self.micro_batches(step) for i in rows]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / len(self.dataset)


class Collator:
    """Rows -> padded tensors (transformers' DataCollatorForSeq2Seq) plus the raw texts."""

    def __init__(self, tokenizer, model):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, return_tensors="pt")

    def __call__(self, rows: dict) -> dict:
        features = [
            {"input_ids": i, "attention_mask": [1] * len(i), "labels": l}
            for i, l in zip(rows["input_ids"], rows["labels"])
        ]
        batch = dict(self.pad(features))
        batch["sources"] = rows["source"]
        batch["references"] = rows["references"]
        return batch


def default_data_dir() -> str:
    return os.environ.get("MLEPS_DATA_DIR", "data")

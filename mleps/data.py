"""Datasets: load a split with `datasets`, check it, tokenise it with `map`, batch it.

A split comes from a file (data.<split>_file: JSONL, CSV, TSV, a .txt of documents), from a dataset
named by data.dataset (a hub name for `datasets.load_dataset`, or a `save_to_disk` folder; its
data.<split>_split), or from a Dataset handed over in Python (mleps.api).

Every split becomes three columns: `source` (str), `target` (str, the training label) and
`references` (list[str]: the target plus any `data.reference_columns`, for evaluation).

data.task=completion reads documents instead (`data.text_column` of a JSONL/CSV/TSV file, or
one document per non-empty line of a .txt): `load_split` gives each as `source`, and once the
tokenizer exists `completion_pairs` cuts each into a prefix (`source`, `input_ids`: the first
data.prefix_tokens tokens) and a reference continuation (`target`, `labels`: up to
data.continuation_tokens more, then EOS when the document ends there; a continuation cut
short has none, so a model can learn to stop and "does not stop" stays a defect to measure).
data.sequences=paragraphs|documents makes each non-empty line (paragraphs, as WikiText-103's raw
files hold them) or each whole document one sequence instead: its prefix, then the rest of it and
EOS, so every reference ends; sequences of at most data.min_sequence_tokens tokens (the reference
code drops those) or over data.max_sequence_tokens are dropped and counted.
`TokenBudgetStream` batches such sequences by length (trainer.batch_tokens), as the reference does.
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
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text"}
TASKS = ("pairs", "completion")
SEQUENCES = ("windows", "paragraphs", "documents")
LOSS_ON = ("all", "continuation")


def data_path(path: str) -> Path:
    """Relative paths are relative to where the command was started (not Hydra's run dir)."""
    try:
        return Path(to_absolute_path(path))
    except ValueError:  # outside a Hydra app
        return Path(path).absolute()


# Columns the pipeline itself writes; any other column of a dataset handed to mleps.api travels with its
# rows to the task losses (DecodedBatch.columns).
OWN_COLUMNS = ("source", "target", "references", "input_ids", "labels", "truncated", "ends_document")


def load_split(data_cfg, split: str, dataset: datasets.Dataset | None = None) -> datasets.Dataset:
    """Load, validate and normalise one split to columns source/target/references. `dataset`: the rows
    themselves instead of data.<split>_file (mleps.api), in the file's columns; a pairs task keeps their
    other columns for the task losses."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if dataset is not None:
        return _normalise(dataset, data_cfg, split, Path(f"<{split} dataset>"), keep_columns=True)
    if uses_dataset(data_cfg):
        raw, label = _named_dataset_split(data_cfg, split)
        return _normalise(raw, data_cfg, split, label)
    file = getattr(data_cfg, f"{split}_file", None)
    if not file:
        raise UserError(f"data.{split}_file is not set for data={data_cfg.name}: set data.{split}_file=PATH, or "
                        f"data.dataset=NAME (a hub name for datasets.load_dataset, or a save_to_disk folder)")
    path = data_path(file)
    if path.is_dir():
        raise UserError(f"data.{split}_file={file} is a folder ({path}): pass the data file itself, e.g. "
                        f"{path / f'{split}.jsonl'}")
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run `make data`, or set data_dir=... or MLEPS_DATA_DIR)")
    if path.stat().st_size == 0:
        raise UserError(f"data file is empty: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    completion = data_cfg.get("task", "pairs") == "completion"
    if fmt is None or (fmt == "text" and not completion):
        raise UserError(f"unsupported data file type '{path.suffix}' for {path}: use .jsonl, .json, .csv or .tsv"
                        f"{'' if completion else ' (.txt: with data.task=completion)'}")
    _check_utf8(path)

    kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
    try:
        raw = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise UserError(f"could not parse {path} as {path.suffix[1:].upper()}: {_parser_reason(e)}") from None
    return _normalise(raw, data_cfg, split, path)


def _parser_reason(e: BaseException) -> str:
    """The parser's own reason ("Expected 2 fields in line 7, saw 3"), not the wrapper datasets puts around it
    ("An error occurred while generating the dataset"): the innermost exception that says something."""
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in reversed(chain):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if lines:
            return " ".join(lines)[:300]
    return type(e).__name__


def uses_dataset(data_cfg) -> bool:
    """data.dataset names the data (data=hf): the *_file keys are not read."""
    return bool(data_cfg.get("dataset"))


def has_split(data_cfg, split: str) -> bool:
    """Whether the config names a source for the split (a file, or a split of data.dataset)."""
    return bool(data_cfg.get(f"{split}_split" if uses_dataset(data_cfg) else f"{split}_file"))


def _named_dataset_split(data_cfg, split: str) -> tuple[datasets.Dataset, Path]:
    """One split of data.dataset: a save_to_disk folder (load_from_disk), else datasets.load_dataset (the hub,
    or a folder of data files). data.<split>_split may be a slice (train[:1000]), read by datasets itself.
    Streaming (an IterableDataset) is not offered: batches are indexed by step (BatchStream) and
    trainer.batch_tokens sorts the whole split by length, so both need a map-style Dataset; a slice of a
    large corpus keeps the rows that are read small."""
    name, config = data_cfg.dataset, data_cfg.get("dataset_config")
    spec = data_cfg.get(f"{split}_split")
    if not spec:
        raise UserError(f"data.{split}_split is not set for data.dataset={name}: set data.{split}_split=NAME")
    label = Path(f"{name}[{spec}]")
    folder = data_path(name)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():  # save_to_disk's layout
        if config:
            raise UserError(f"data.dataset_config={config} is for hub datasets; {folder} was saved with "
                            f"save_to_disk and has none: drop data.dataset_config")
        saved = datasets.load_from_disk(str(folder))
        splits = saved if isinstance(saved, datasets.DatasetDict) else {str(saved.split or "train"): saved}
        try:
            parts = [splits[p.splitname].select(range(p.from_, p.to)) for p in
                     datasets.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in splits.items()})]
        except ValueError as e:  # an unknown split name or a malformed slice
            raise UserError(f"data.{split}_split={spec}: {e} ({folder} has: {', '.join(splits)}); set "
                            f"data.{split}_split to one of them{' or null' if split != 'train' else ''}") from None
        return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), label
    try:
        return datasets.load_dataset(name, config, split=spec), label
    except Exception as e:  # noqa: BLE001  (not found, offline, unknown config or split: datasets raises several types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"data.dataset={name}{f' data.dataset_config={config}' if config else ''} "
                        f"data.{split}_split={spec}: datasets.load_dataset failed: {first}; check those keys, or "
                        f"(offline) pass a folder written by save_to_disk") from None


def _flattened(raw: datasets.Dataset, columns) -> datasets.Dataset:
    """Struct columns as dotted ones (translation -> translation.de, translation.en) when a configured
    column is not a top-level one: WMT's and IWSLT's layout on the hub."""
    return raw if all(c in raw.column_names for c in columns) else raw.flatten()


def _normalise(raw: datasets.Dataset, data_cfg, split: str, path: Path, keep_columns: bool = False):
    if len(raw) == 0:
        raise UserError(f"data file has no rows: {path}")
    if data_cfg.get("task", "pairs") == "completion":
        return _documents(raw, data_cfg, split, path)

    # Extra references are for evaluation; training splits need not have them (AESLC's train has none).
    extra = list(data_cfg.reference_columns) if split != "train" else []
    columns = [data_cfg.source_column, data_cfg.target_column, *extra]
    raw = _flattened(raw, columns)
    own = {"source", "target"} & set(raw.column_names)
    if keep_columns and len(own) == 1 and any(col not in raw.column_names for col in columns):
        # a dataset handed over in Python whose "source"/"target" pair is half there: name the missing half
        # (not the data config's own column names, which the pair would have replaced)
        missing = ({"source", "target"} - own).pop()
        raise UserError(f"column '{missing}' not found in {path}; it has: {', '.join(raw.column_names)} (a dataset "
                        f"needs both 'source' and 'target' columns, or set data.source_column / data.target_column)")
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

    source_column, target_column = data_cfg.source_column, data_cfg.target_column

    def normalise(row):  # closes over plain strings: datasets hashes it to the same fingerprint in every run
        source = _text(row[source_column])
        target = _text(row[target_column])
        refs = [target] if target else []
        for col in extra:
            value = row[col]
            refs += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
        return {"source": source, "target": target, "references": [r for r in refs if r]}

    # keep_columns: the caller's other columns stay beside source/target/references
    dropped = [c for c in raw.column_names if not keep_columns or c in columns or c in OWN_COLUMNS]
    ds = raw.map(normalise, remove_columns=dropped, desc=f"normalise {split}")
    # Training needs a target; evaluation needs at least one reference.
    keep = (lambda r: bool(r["source"]) and bool(r["target"])) if split == "train" else (
        lambda r: bool(r["source"]) and bool(r["references"]))
    return _kept(ds, keep, data_cfg, split, path, "rows with an empty source or target")


def _kept(ds: datasets.Dataset, keep, data_cfg, split: str, path: Path, dropped: str) -> datasets.Dataset:
    """The rows `keep` accepts (the others counted in a warning), cut to the split's example limit."""
    kept = ds.filter(keep)
    if len(kept) < len(ds):
        log.warning("%s: skipped %d of %d %s", path.name, len(ds) - len(kept), len(ds), dropped)
    if len(kept) == 0:
        raise UserError(f"{path}: all {len(ds)} are {dropped}")
    limit = data_cfg.max_train_examples if split == "train" else data_cfg.max_eval_examples
    if limit is not None and limit < len(kept):
        kept = kept.select(range(limit))
    return kept


def _documents(raw: datasets.Dataset, data_cfg, split: str, path: Path) -> datasets.Dataset:
    """A completion task's documents as `source` (target and references come with completion_pairs)."""
    column = "text" if path.suffix.lower() == ".txt" else data_cfg.text_column
    raw = _flattened(raw, [column])
    if column not in raw.column_names or not isinstance(raw.features[column], datasets.Value):
        raise UserError(f"text column '{column}' not found in {path} (or not text); it has: "
                        f"{', '.join(raw.column_names)} (set data.text_column)")
    if data_cfg.get("sequences", "windows") == "paragraphs":  # one row per non-empty line of each document
        def rows(batch):
            lines = [line.strip() for text in batch[column] for line in _text(text).splitlines()]
            return {"source": [x for x in lines if x]}
        ds = raw.map(rows, batched=True, remove_columns=raw.column_names, desc=f"paragraphs {split}")
        ds = ds.map(lambda row: {"target": "", "references": []}, desc=f"paragraphs {split}")
        if len(ds) == 0:
            raise UserError(f"{path}: no non-empty line in column '{column}', so no paragraph to train on: "
                            f"point data.text_column at a text column, or use data.sequences=documents")
        what = "empty paragraphs"
    else:
        ds = raw.map(lambda row: {"source": _text(row[column]), "target": "", "references": []},
                     remove_columns=raw.column_names, desc=f"documents {split}")
        what = f"empty documents (column '{column}')"
    return _kept(ds, lambda r: bool(r["source"]), data_cfg, split, path, what)


def completion_pairs(docs: datasets.Dataset, tokenizer, data_cfg, split: str = "train") -> datasets.Dataset:
    """Documents -> (prefix, continuation) rows; documents with no token after the prefix are skipped
    and counted. The prefix text is re-encoded the way decoding encodes prompts, so the prompt a model
    trains on is the prompt it decodes from."""
    if data_cfg.get("sequences", "windows") != "windows":
        return _whole_sequences(docs, tokenizer, data_cfg, split)
    prefix_len, cont_len, eos = data_cfg.prefix_tokens, data_cfg.continuation_tokens, tokenizer.eos_token_id

    def fn(batch):
        out = {"source": [], "target": [], "references": [], "input_ids": [], "labels": [], "ends_document": []}
        for ids in tokenizer(batch["source"], add_special_tokens=False)["input_ids"]:
            if len(ids) <= prefix_len:
                continue
            prefix, continuation = ids[:prefix_len], ids[prefix_len:prefix_len + cont_len]
            ends = len(ids) <= prefix_len + cont_len
            source = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
            target = tokenizer.decode(continuation, clean_up_tokenization_spaces=False).strip()
            out["source"].append(source)
            out["target"].append(target)
            out["references"].append([target] if target else [])
            out["input_ids"].append(tokenizer(source)["input_ids"])
            out["labels"].append(continuation + [eos] if ends else continuation)
            out["ends_document"].append(ends)
        return out

    pairs = docs.map(fn, batched=True, remove_columns=docs.column_names, desc=f"completion pairs {split}")
    skipped = len(docs) - len(pairs)
    if skipped:
        log.warning("%s: skipped %d of %d documents of at most data.prefix_tokens=%d tokens", split, skipped,
                    len(docs), prefix_len)
    if len(pairs) == 0:
        raise UserError(f"{split}: every document has at most data.prefix_tokens={prefix_len} tokens: "
                        f"lower data.prefix_tokens")
    if data_cfg.get("whole_documents", False):
        whole = pairs.filter(lambda r: r["ends_document"])
        log.warning("%s: data.whole_documents keeps the %d of %d documents that end within %d + %d tokens",
                    split, len(whole), len(pairs), prefix_len, cont_len)
        if len(whole) == 0:
            raise UserError(f"{split}: no document ends within data.prefix_tokens + data.continuation_tokens = "
                            f"{prefix_len + cont_len} tokens: raise data.continuation_tokens or set "
                            f"data.whole_documents=false")
        pairs = whole
    if split != "train":  # a continuation that decodes to no text cannot be scored
        pairs = pairs.filter(lambda r: bool(r["references"]))
    return pairs


def _whole_sequences(docs: datasets.Dataset, tokenizer, data_cfg, split: str) -> datasets.Dataset:
    """data.sequences=paragraphs|documents: each row whole, as (prefix, the rest + EOS). Rows of at most
    data.min_sequence_tokens tokens (or the prefix), or over data.max_sequence_tokens, are dropped and counted."""
    prefix_len, eos, kind = data_cfg.prefix_tokens, tokenizer.eos_token_id, data_cfg.sequences
    shortest, longest = max(data_cfg.min_sequence_tokens, prefix_len), data_cfg.max_sequence_tokens
    token_ids = tokenizer(list(docs["source"]), add_special_tokens=False)["input_ids"]
    short = sum(len(ids) <= shortest for ids in token_ids)
    long = sum(longest is not None and len(ids) > longest for ids in token_ids)
    kept = [ids for ids in token_ids if shortest < len(ids) and (longest is None or len(ids) <= longest)]
    if short or long:
        log.warning("%s: dropped %d of %d %s of at most %d tokens (data.min_sequence_tokens) and %d of more than "
                    "data.max_sequence_tokens=%s", split, short, len(docs), kind, shortest, long, longest)
    if not kept:
        raise UserError(f"{split}: no usable {kind[:-1]}: all {len(docs)} have at most {shortest} tokens or more "
                        f"than data.max_sequence_tokens={longest}: lower data.min_sequence_tokens or "
                        f"data.prefix_tokens, or raise data.max_sequence_tokens")
    sources = [tokenizer.decode(ids[:prefix_len], clean_up_tokenization_spaces=False) for ids in kept]
    targets = [tokenizer.decode(ids[prefix_len:], clean_up_tokenization_spaces=False).strip() for ids in kept]
    pairs = datasets.Dataset.from_dict({
        "source": sources, "target": targets, "references": [[t] if t else [] for t in targets],
        # the prefix text re-encoded as decoding encodes prompts (see completion_pairs)
        "input_ids": tokenizer(sources)["input_ids"], "labels": [ids[prefix_len:] + [eos] for ids in kept],
        "ends_document": [True] * len(kept)})
    if split != "train":  # a continuation that decodes to no text cannot be scored
        pairs = pairs.filter(lambda r: bool(r["references"]))
    return pairs


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
    """Token ids for source and target, truncated to the configured lengths (and counted). A split
    that already has them (completion_pairs) is returned as it is."""
    if "input_ids" in ds.column_names:
        return ds
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

    @property
    def units(self) -> int:
        """What an epoch permutes: rows (TokenBudgetStream: whole batches)."""
        return len(self.dataset)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.units, generator=g)}
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


class TokenBudgetStream(BatchStream):
    """trainer.batch_tokens: length-sorted batches of at most `batch_tokens` padded tokens (rows x the
    longest row) per micro-batch, as the reference code batches paragraphs. A step's global batch holds
    up to batch_tokens x the count of micro-batches (processes x accumulation) and at least one row per
    micro-batch, cut into micro-batches [j::count] as in BatchStream; so 2 processes see the batches one
    process with 2 accumulation steps sees. The batches are cut once (sequences sorted by length, ties in
    a seeded order); each epoch visits them in a permutation seeded by (seed, epoch), so a step's batch is
    still a pure function of (seed, step). A sequence longer than the budget is a batch of its own.
    """

    def __init__(self, dataset, batch_tokens: int, lengths: list[int], seed: int, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.world_size, self.accumulation = world_size, accumulation
        self.count = world_size * accumulation
        self.batch_size = None  # varies with the batch
        if len(lengths) < self.count:
            raise UserError(f"{len(lengths)} training sequences cannot fill the {self.count} micro-batches of a "
                            f"step (processes x accumulation): lower trainer.gradient_accumulation_steps")
        budget = batch_tokens * self.count
        g = torch.Generator().manual_seed(seed * 100_003 + 7)
        ties = torch.randperm(len(lengths), generator=g).tolist()
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], ties[i]))
        self.batches, current, longest = [], [], 0
        for i in order:
            if len(current) >= self.count and max(longest, lengths[i]) * (len(current) + 1) > budget:
                self.batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, lengths[i])
        if len(current) < self.count:  # the longest rows: too few for a batch of their own
            self.batches[-1] += current
        else:
            self.batches.append(current)
        self._perms = {}

    @property
    def units(self) -> int:
        return len(self.batches)

    def global_indices(self, step: int) -> list[int]:
        n = len(self.batches)
        return list(self.batches[int(self._perm(step // n)[step % n])])

    def epoch(self, step: int) -> float:
        return step / len(self.batches)


def batch_stream(dataset, trainer_cfg, rows_per_micro_batch: int, seed: int, rank: int, world_size: int):
    """The phase's training batches: fixed-size (trainer.batch_size) or by token budget (trainer.batch_tokens)."""
    accumulation = trainer_cfg.gradient_accumulation_steps
    budget = trainer_cfg.get("batch_tokens")
    if budget:
        lengths = [len(a) + len(b) for a, b in zip(list(dataset["input_ids"]), list(dataset["labels"]))]
        return TokenBudgetStream(dataset, budget, lengths, seed, rank, world_size, accumulation)
    return BatchStream(dataset, rows_per_micro_batch, seed, rank, world_size, accumulation)


class Collator:
    """Rows -> the model family's padded tensors (mleps.families) plus the raw texts."""

    def __init__(self, tokenizer, model, loss_on: str | None = None):
        from mleps.families import family_for

        self.pad = family_for(model).collator(tokenizer, model, loss_on)

    def __call__(self, rows: dict) -> dict:
        batch = self.pad(rows)
        batch["sources"] = rows["source"]
        batch["references"] = rows["references"]
        columns = Columns({k: v for k, v in rows.items() if k not in OWN_COLUMNS})
        if columns:
            batch["columns"] = columns
        return batch


class Columns(dict):
    """A batch's extra dataset columns, name -> one value per row. Indexing with a slice or a list of
    rows cuts every column, so a batch's values all cut alike (`{k: v[:n] for k, v in batch.items()}`)."""

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Columns({k: v[key] for k, v in self.items()})
        if isinstance(key, (list, tuple)):
            return Columns({k: [v[i] for i in key] for k, v in self.items()})
        return super().__getitem__(key)


def extra_columns(ds: datasets.Dataset) -> list[str]:
    """The columns of a split beyond the pipeline's own (those a task loss may receive)."""
    return [c for c in ds.column_names if c not in OWN_COLUMNS]


def default_data_dir() -> str:
    return os.environ.get("MLEPS_DATA_DIR", "data")

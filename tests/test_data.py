"""Data configs load into source/target/references; local JSONL/CSV/TSV; skipping and truncation counts."""
from __future__ import annotations

import json
import logging

import pytest

from conftest import compose_cfg, write_jsonl
from mleps.data import BatchStream, load_split, tokenize
from mleps.errors import UserError


def _raw_rows(path, n):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


# --------------------------------------------------------------------------- multi30k


def test_multi30k_splits_load_with_the_configured_columns_and_limits(base_cfg, data_dir):
    data = base_cfg.data
    assert data.name == "multi30k_de_en"
    train = load_split(data, "train")
    assert set(train.column_names) == {"source", "target", "references"}
    assert len(train) == 256  # data.max_train_examples
    raw = _raw_rows(data_dir / "multi30k" / "train.jsonl", 3)
    for i in range(3):
        assert train[i]["source"] == raw[i]["de"].strip()
        assert train[i]["target"] == raw[i]["en"].strip()
        assert train[i]["references"] == [raw[i]["en"].strip()]
    for split in ("validation", "test"):
        ds = load_split(data, split)
        assert len(ds) == 32  # data.max_eval_examples
        assert all(len(r) == 1 for r in ds["references"])
    data.max_eval_examples = None
    assert len(load_split(data, "validation")) == 1014
    assert len(load_split(data, "test")) == 1000


# --------------------------------------------------------------------------- aeslc


@pytest.fixture
def aeslc_cfg(data_dir):
    if not (data_dir / "aeslc" / "validation.jsonl").is_file():
        pytest.skip(f"AESLC not found under {data_dir}/aeslc: run `make data`")
    return compose_cfg("data=aeslc", f"data_dir={data_dir}", "data.max_train_examples=50",
                       "data.max_eval_examples=40")


def test_aeslc_validation_references_are_subject_line_plus_annotations(aeslc_cfg, data_dir):
    ds = load_split(aeslc_cfg.data, "validation")
    assert len(ds) == 40
    raw = _raw_rows(data_dir / "aeslc" / "validation.jsonl", 40)
    for row, r in zip(ds, raw):
        assert row["source"] == r["email_body"].strip()
        assert row["target"] == r["subject_line"].strip()
        expected = [r["subject_line"].strip(), *[a.strip() for a in r["annotations"]]]
        assert row["references"] == [x for x in expected if x]
    assert sum(len(refs) == 4 for refs in ds["references"]) >= 35  # 3 annotators + the subject line
    test = load_split(aeslc_cfg.data, "test")
    assert max(len(refs) for refs in test["references"]) == 4


def test_aeslc_train_split_loads_without_the_annotation_column(aeslc_cfg):
    """The training file has no `annotations` (references are evaluation-only): `data=aeslc` must train."""
    ds = load_split(aeslc_cfg.data, "train")
    assert len(ds) == 50
    assert all(refs == [t] for refs, t in zip(ds["references"], ds["target"]))


# --------------------------------------------------------------------------- local files


def _local(tmp_path, train, validation=None, *extra):
    over = ["data=local", f"data.train_file={train}"]
    if validation is not None:
        over.append(f"data.validation_file={validation}")
    return compose_cfg(*over, *extra).data


def test_local_jsonl_with_a_list_reference_column(tmp_path):
    rows = [{"source": f"s{i}", "target": f"t{i}", "refs": [f"r{i}a", f"r{i}b"]} for i in range(6)]
    rows[2]["refs"] = []  # no extra reference for this one
    f = write_jsonl(tmp_path / "data.jsonl", rows)
    data = _local(tmp_path, f, f, "data.reference_columns=[refs]")
    assert data.name == "local" and list(data.reference_columns) == ["refs"]
    val = load_split(data, "validation")
    assert val["references"][0] == ["t0", "r0a", "r0b"]
    assert val["references"][2] == ["t2"]
    train = load_split(data, "train")
    assert train["target"] == [f"t{i}" for i in range(6)]


def test_local_csv_quotes_and_a_string_reference_column(tmp_path):
    f = tmp_path / "dev.csv"
    f.write_text('src,tgt,alt\n"a, b",x,y\nplain,"say ""hi""",z\n', encoding="utf-8")
    data = _local(tmp_path, f, f, "data.source_column=src", "data.target_column=tgt",
                  "data.reference_columns=[alt]")
    ds = load_split(data, "validation")
    assert ds["source"] == ["a, b", "plain"]
    assert ds["target"] == ["x", 'say "hi"']
    assert ds["references"] == [["x", "y"], ['say "hi"', "z"]]


def test_local_tsv_keeps_quotes_literally(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('source\ttarget\n"quoted start\tone, two\nit\'s\t5" tall\n', encoding="utf-8")
    data = _local(tmp_path, f)
    ds = load_split(data, "train")
    assert ds["source"] == ['"quoted start', "it's"]
    assert ds["target"] == ["one, two", '5" tall']


def test_blank_lines_and_empty_sources_are_skipped_and_counted(tmp_path, caplog):
    good = [{"source": f"s{i}", "target": f"t{i}"} for i in range(5)]
    lines = [json.dumps(good[0]), "", json.dumps(good[1]), json.dumps({"source": "", "target": "t"}),
             "   ", json.dumps({"source": "  ", "target": "t"}), json.dumps(good[2]),
             json.dumps({"source": "s", "target": ""}), json.dumps(good[3]), json.dumps(good[4]), ""]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    caplog.set_level(logging.WARNING, logger="mleps.data")
    ds = load_split(_local(tmp_path, f), "train")
    assert ds["source"] == [f"s{i}" for i in range(5)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 3 of 8 rows" in m for m in messages), messages


def test_a_10000_token_example_is_truncated_and_counted(tmp_path, caplog, session_cache_dir):
    from mleps.models import bpe_tokenizer

    rows = [{"source": f"ein kleiner Hund Nummer {i}", "target": f"a small dog number {i}"} for i in range(40)]
    rows[7]["source"] = " ".join(f"w{i % 97}" for i in range(10_000))
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    data = _local(tmp_path, f, None, "data.max_source_length=64", "data.max_target_length=48")
    ds = load_split(data, "train")
    tok = bpe_tokenizer(data, ds, 300, session_cache_dir)
    assert len(tok(rows[7]["source"])["input_ids"]) >= 10_000
    caplog.set_level(logging.WARNING, logger="mleps.data")
    out = tokenize(ds, tok, data)
    assert [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()] == [
        "truncated 1 of 40 examples to 64 source / 48 target tokens"]
    assert len(out[7]["input_ids"]) == 64
    assert out[7]["input_ids"][-1] == tok.eos_token_id  # still ends like the others
    assert out["truncated"] == [i == 7 for i in range(40)]
    assert max(len(x) for x in out["labels"]) <= 48


# --------------------------------------------------------------------------- batches


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(10))})
    a, b = BatchStream(ds, 4, seed=3), BatchStream(ds, 4, seed=3)
    steps = [a.indices(s) for s in range(10)]
    assert [b.indices(s) for s in reversed(range(10))] == list(reversed(steps))
    flat = [i for s in steps for i in s]  # 40 draws = 4 epochs, each a permutation
    for e in range(4):
        assert sorted(flat[10 * e:10 * (e + 1)]) == list(range(10))
    assert BatchStream(ds, 4, seed=4).indices(0) != steps[0] or BatchStream(ds, 4, seed=4).indices(1) != steps[1]
    # Two processes split each global batch.
    r0, r1 = BatchStream(ds, 2, 3, rank=0, world_size=2), BatchStream(ds, 2, 3, rank=1, world_size=2)
    assert sorted(r0.indices(5) + r1.indices(5)) == sorted(steps[5])


def test_a_batch_larger_than_the_dataset_is_a_user_error():
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(10))})
    with pytest.raises(UserError, match="larger than the training set"):
        BatchStream(ds, 11, seed=0)

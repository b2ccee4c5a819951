"""data=hf: a dataset by name (datasets.load_dataset) or a save_to_disk folder (load_from_disk), with
dotted columns for struct layouts (WMT's translation.de), split slices, and one-line errors at start.
Offline, as CI runs: the folders are DatasetDicts built here from Multi30k rows."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict, Features, Translation, Value

from conftest import TINY_CLI, assert_user_error, compose_cfg, read_jsonl, run_cli, run_main
from mleps.data import load_split
from mleps.errors import UserError

SIZES = {"train": 48, "validation": 6, "test": 5}
TRAIN = ["trainer=mle", *TINY_CLI, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=100",
         "trainer.log_every=1", "decode.max_new_tokens=8"]


def _splits(rows: list[dict]) -> dict[str, list[dict]]:
    out, start = {}, 0
    for split, n in SIZES.items():
        out[split], start = rows[start:start + n], start + n
    return out


@pytest.fixture(scope="module")
def wmt_layout(tmp_path_factory, multi30k_rows):
    """Multi30k rows in wmt16's layout: one `translation` column of Translation(de, en)."""
    features = Features({"translation": Translation(languages=["de", "en"])})
    folder = tmp_path_factory.mktemp("hf") / "wmt_layout"
    DatasetDict({split: Dataset.from_list([{"translation": {"de": r["de"], "en": r["en"]}} for r in rows],
                                          features=features)
                 for split, rows in _splits(multi30k_rows).items()}).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def flat_layout(tmp_path_factory, multi30k_rows):
    """Multi30k rows as they are (de, en), plus an extra reference column."""
    folder = tmp_path_factory.mktemp("hf") / "flat_layout"
    DatasetDict({split: Dataset.from_list([dict(r, alt=[r["en"].upper()]) for r in rows])
                 for split, rows in _splits(multi30k_rows).items()}).save_to_disk(folder)
    return folder


def hf_data(folder, *extra: str):
    return compose_cfg("data=hf", f"data.dataset={folder}", *extra).data


# -- loading ----------------------------------------------------------------------------------------


def test_dotted_columns_read_a_struct_column_as_wmt16_holds_it(wmt_layout, multi30k_rows):
    data = hf_data(wmt_layout, "data.source_column=translation.de", "data.target_column=translation.en")
    train = load_split(data, "train")
    assert list(train["source"]) == [r["de"].strip() for r in multi30k_rows[:48]]
    assert list(train["target"]) == [r["en"].strip() for r in multi30k_rows[:48]]
    validation = load_split(data, "validation")
    assert list(validation["references"]) == [[r["en"].strip()] for r in multi30k_rows[48:54]]


def test_a_split_slice_and_extra_reference_columns(flat_layout, multi30k_rows):
    data = hf_data(flat_layout, "data.source_column=de", "data.target_column=en", "data.reference_columns=[alt]",
                   "data.train_split='train[:10]+validation[:2]'", "data.test_split='test[1:3]'")
    train = load_split(data, "train")
    assert list(train["source"]) == [r["de"].strip() for r in multi30k_rows[:10] + multi30k_rows[48:50]]
    test = load_split(data, "test")
    assert list(test["references"]) == [[r["en"].strip(), r["en"].strip().upper()] for r in multi30k_rows[55:57]]


def test_a_single_saved_dataset_is_the_train_split(tmp_path, multi30k_rows):
    Dataset.from_list(multi30k_rows[:8]).save_to_disk(tmp_path / "one")
    data = hf_data(tmp_path / "one", "data.source_column=de", "data.target_column=en")
    assert len(load_split(data, "train")) == 8
    with pytest.raises(UserError, match=r"data.validation_split=validation: .*has: train.* or null"):
        load_split(data, "validation")


# -- training and evaluating --------------------------------------------------------------------------


def test_mle_trains_on_a_saved_datasetdict_and_evaluate_reads_its_test_split(tmp_path, capfd, wmt_layout):
    run = tmp_path / "run"
    columns = ["data.source_column=translation.de", "data.target_column=translation.en"]
    code, out, err = run_main("mleps.train", *TRAIN, "data=hf", f"data.dataset={wmt_layout}", *columns,
                              f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if e["split"] == "train"] == [1, 2]
    assert [e["n"] for e in events if e["split"] == "validation"] == [SIZES["validation"]] * 2  # start and end
    # the checkpoint remembers data=hf and its columns: evaluate needs no data overrides
    code, out, err = run_main("mleps.evaluate", f"checkpoint={run / 'checkpoints' / 'last'}", "progress=false",
                              "decode.max_new_tokens=8", capfd=capfd)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["data"], result["split"], result["n"]) == ("hf", "test", SIZES["test"])
    assert result["predictions"].endswith(".txt") and "wmt_layout-test" in result["predictions"]
    assert len(open(result["predictions"], encoding="utf-8").read().splitlines()) == SIZES["test"]


def test_completion_trains_tiny_gpt2_on_a_text_column(tmp_path, capfd, multi30k_rows):
    docs = [" ".join(r["en"] for r in multi30k_rows[i:i + 3]) for i in range(0, 120, 3)]  # 40 documents
    folder = tmp_path / "docs"
    DatasetDict({"train": Dataset.from_dict({"text": docs[:32], "id": list(range(32))}),
                 "validation": Dataset.from_dict({"text": docs[32:], "id": list(range(8))})}).save_to_disk(folder)
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, "model=tiny_gpt2", "data=hf", f"data.dataset={folder}",
                            "data.task=completion", "data.text_column=text", "data.prefix_tokens=5",
                            "data.continuation_tokens=8", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if e["split"] == "train"] == [1, 2]
    assert [e["n"] for e in events if e["split"] == "validation"] == [8, 8]


# -- bad input: one line at start, nothing written -----------------------------------------------------


@pytest.mark.parametrize("overrides,needles", [
    (["data.source_column=translation.fr"], ["column 'translation.fr'", "translation.de", "data.source_column"]),
    (["data.validation_split=dev"], ["data.validation_split=dev", "has: train, validation, test"]),
    (["data.train_split='train[:'"], ["data.train_split=train[:"]),
    (["data.dataset_config=de-en"], ["data.dataset_config=de-en", "drop data.dataset_config"]),
])
def test_a_bad_column_split_or_config_is_one_line_at_start(tmp_path, capfd, wmt_layout, overrides, needles):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TRAIN, "data=hf", f"data.dataset={wmt_layout}",
                            "data.source_column=translation.de", "data.target_column=translation.en", *overrides,
                            f"output_dir={run}", capfd=capfd)
    assert_user_error(code, err, *needles)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_data_hf_without_a_dataset_says_which_key(tmp_path, capfd):
    code, _, err = run_main("mleps.train", *TRAIN, "data=hf", f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, "data.train_file is not set for data=hf", "data.dataset=NAME", "save_to_disk")


@pytest.mark.slow  # a real process: datasets and huggingface_hub read the offline switches when imported
def test_an_unknown_hub_name_offline_fails_at_once_with_one_line(tmp_path):
    run = tmp_path / "run"
    rc, _, err = run_cli("mleps.train", *TRAIN, "data=hf", "data.dataset=no-such-owner/no-such-dataset",
                         f"output_dir={run}", cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert_user_error(rc, err, "data.dataset=no-such-owner/no-such-dataset", "load_dataset failed",
                      "save_to_disk")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_run_made_before_the_dataset_keys_existed_still_resumes(tmp_path):
    """Its config.yaml lacks data.dataset, data.*_split...: at their defaults they are no difference."""
    from omegaconf import OmegaConf

    from mleps.rundir import CONFIG_FILE, _check_same_config

    cfg = compose_cfg("data=local", "data.train_file=/x/train.jsonl")
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("dataset", "dataset_config", "train_split", "validation_split", "test_split"):
        del old["data"][key]
    (tmp_path / CONFIG_FILE).write_text(OmegaConf.to_yaml(old))
    _check_same_config(cfg, tmp_path)
    with pytest.raises(UserError, match=r"data.dataset: None -> 'wmt16'"):
        _check_same_config(compose_cfg("data=local", "data.train_file=/x/train.jsonl", "data.dataset=wmt16"), tmp_path)

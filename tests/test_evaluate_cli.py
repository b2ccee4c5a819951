"""python -m mleps.evaluate: the JSON line, the predictions file, BLEU as sacrebleu computes it."""
from __future__ import annotations

import json

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU

from conftest import assert_user_error, run_cli, run_main


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def _refs(path, n, column):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[column].strip() for _, line in zip(range(n), f)]


@pytest.mark.slow
def test_evaluate_cli_prints_json_and_its_bleu_is_sacrebleus(trained_run, data_dir, tmp_path):
    assert trained_run.rc == 0, trained_run.stderr[-3000:]
    ckpt = trained_run.dir / "checkpoints" / "last"
    rc, out, err = run_cli("mleps.evaluate", f"checkpoint={ckpt}", "data=multi30k_de_en", "split=test",
                           "data.max_eval_examples=64", "progress=false", "decode.max_new_tokens=24",
                           cwd=tmp_path, env={"MLEPS_DATA_DIR": str(data_dir)})
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    result = _last_json(out)
    assert {"metric", "score", "n", "bleu", "signature", "predictions"} <= set(result)
    assert result["metric"] == "bleu" and result["n"] == 64
    # beside the weights, named by the data file and (hashed with its path) the settings that change the output
    preds_file = ckpt / result["predictions"].rsplit("/", 1)[-1]
    assert result["predictions"] == str(preds_file) and preds_file.name.startswith("predictions-multi30k_de_en-test-test-")
    preds = preds_file.read_text(encoding="utf-8").split("\n")
    assert preds[-1] == "" and len(preds) - 1 == 64  # n lines, each newline-terminated
    preds = preds[:-1]

    refs = _refs(data_dir / "multi30k" / "test.jsonl", 64, "en")
    expected = sacrebleu.corpus_bleu(preds, [refs])
    assert result["score"] == pytest.approx(expected.score, abs=1e-9)
    assert result["bleu"] == pytest.approx(expected.score, abs=1e-9)
    # the non-trivial parts of the score (BLEU itself is ~0 after 30 steps): lengths and precisions
    assert result["sys_len"] == expected.sys_len > 0 and result["ref_len"] == expected.ref_len > 0
    assert result["precisions"] == pytest.approx(expected.precisions, abs=1e-9)
    bleu = BLEU()
    bleu.corpus_score(preds, [refs])
    assert result["signature"] == str(bleu.get_signature())


@pytest.mark.slow
def test_evaluate_uses_every_aeslc_reference(trained_run, data_dir, tmp_path, capfd):
    """Multi-reference scoring: subject line + 3 annotations, as sacrebleu's reference streams."""
    if not (data_dir / "aeslc" / "validation.jsonl").is_file():
        pytest.skip(f"AESLC not found under {data_dir}/aeslc: run `make data`")
    assert trained_run.rc == 0, trained_run.stderr[-3000:]
    preds_file = tmp_path / "preds.txt"
    code, out, err = run_main("mleps.evaluate", f"checkpoint={trained_run.dir / 'checkpoints' / 'last'}",
                              "data=aeslc", "split=validation", "data.max_eval_examples=16", f"data_dir={data_dir}",
                              "progress=false", "decode.max_new_tokens=12", f"predictions={preds_file}", capfd=capfd)
    assert code == 0, err
    result = _last_json(out)
    preds = preds_file.read_text(encoding="utf-8").splitlines()
    assert len(preds) == result["n"] == 16
    rows = []
    with open(data_dir / "aeslc" / "validation.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(16), f):
            rows.append(json.loads(line))
    refs = [[r["subject_line"].strip(), *[a.strip() for a in r["annotations"]]] for r in rows]
    assert all(len(r) == 4 for r in refs)
    streams = [[r[j] for r in refs] for j in range(4)]
    expected = sacrebleu.corpus_bleu(preds, streams)
    assert result["score"] == pytest.approx(expected.score, abs=1e-9)
    assert result["ref_len"] == expected.ref_len
    assert "nrefs:4" in result["signature"]


def test_evaluate_a_folder_without_model_files(tmp_path, capfd, data_dir):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    code, _, err = run_main("mleps.evaluate", f"checkpoint={empty}", f"data_dir={data_dir}", capfd=capfd)
    assert_user_error(code, err, str(empty), "no model files")
    code, _, err = run_main("mleps.evaluate", f"checkpoint={tmp_path / 'missing'}", f"data_dir={data_dir}",
                            capfd=capfd)
    assert_user_error(code, err, str(tmp_path / "missing"), "not found")


@pytest.mark.slow
def test_evaluate_a_folder_without_model_files_in_a_real_process(tmp_path):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    rc, out, err = run_cli("mleps.evaluate", f"checkpoint={empty}", cwd=tmp_path)
    assert_user_error(rc, err, str(empty), "no model files")
    assert out.strip() == ""


def test_evaluate_without_a_checkpoint_is_a_user_error(tmp_path, capfd):
    """`checkpoint: ???` left unset: a one-line message naming checkpoint=, not OmegaConf's traceback."""
    code, _, err = run_main("mleps.evaluate", capfd=capfd)
    assert_user_error(code, err, "checkpoint")

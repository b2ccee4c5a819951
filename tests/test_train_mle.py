"""trainer=mle: the loss and its gradient step, over-fitting, the training CLI end to end, bad inputs."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import TINY_CLI, assert_user_error, read_jsonl, run_cli, run_main, write_jsonl
from mleps.data import Collator, load_split, tokenize
from mleps.decoding import translate
from mleps.metrics_config import metric_from_config
from mleps.models import load_model_and_tokenizer
from mleps.trainers.base import token_cross_entropy
from mleps.trainers.mle import MLE


def _setup(cfg, n_rows=16, seed=0):
    torch.manual_seed(seed)
    train = load_split(cfg.data, "train")
    model, tok, prefix = load_model_and_tokenizer(cfg, train)
    rows = tokenize(train, tok, cfg.data, prefix)
    return train, model, tok, rows, Collator(tok, model)(rows[:n_rows])


def _loss(model, batch):
    was = model.training
    model.eval()
    with torch.no_grad():
        loss_sum, tokens = token_cross_entropy(model, batch)
    model.train(was)
    return loss_sum.item() / tokens


# --------------------------------------------------------------------------- the rule


def test_token_cross_entropy_is_transformers_own_loss(base_cfg):
    _, model, tok, _, batch = _setup(base_cfg)
    model.eval()
    ours_sum, tokens = token_cross_entropy(model, batch)
    ours = ours_sum / tokens
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    assert tokens == int((batch["labels"] != -100).sum()) > 16
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # decoder inputs are the labels shifted right behind the decoder start (pad) token
    assert torch.all(batch["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id)
    lab = batch["labels"][:, :-1].clone()
    lab[lab == -100] = tok.pad_token_id
    assert torch.equal(batch["decoder_input_ids"][:, 1:], lab)


def test_an_mle_step_lowers_the_loss_on_a_fixed_batch(base_cfg):
    cfg = base_cfg
    _, model, tok, _, batch = _setup(cfg)
    acc = Accelerator(cpu=True)
    rule = MLE(cfg=cfg.trainer, model=model, tokenizer=tok, metric=None, accelerator=acc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    before = _loss(model, batch)
    assert before > 0.9 * math.log(len(tok))  # an untrained model is close to uniform
    opt.zero_grad()
    stats = rule.step(batch, 0)
    assert stats["loss"] == pytest.approx(before, rel=1e-4)  # dropout 0: train and eval agree
    assert stats["tokens"] == float((batch["labels"] != -100).sum())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    rule.apply(opt)
    after_one = _loss(model, batch)
    assert after_one < before - 0.02, (before, after_one)
    for step in range(1, 10):
        opt.zero_grad()
        rule.step(batch, step)
        rule.apply(opt)
    after_ten = _loss(model, batch)
    assert after_ten < after_one - 0.2, (after_one, after_ten)


@pytest.mark.slow
def test_overfitting_32_pairs_drives_their_bleu_above_50(base_cfg):
    cfg = base_cfg
    cfg.data.max_train_examples = 512  # the tokenizer sees 512 pairs; the model trains on 32
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.ffn_dim = 1000, 64, 128
    train, model, tok, rows, batch = _setup(cfg, n_rows=32)
    pairs = train.select(range(32))
    metric = metric_from_config(cfg.metric)
    rule = MLE(cfg=cfg.trainer, model=model, tokenizer=tok, metric=metric, accelerator=Accelerator(cpu=True))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.98))
    start = metric.corpus_score(translate(model, tok, pairs["source"], cfg.decode), pairs["references"])["score"]
    for step in range(80):
        opt.zero_grad()
        rule.step(batch, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rule.apply(opt)
    hyps = translate(model, tok, pairs["source"], cfg.decode)
    score = metric.corpus_score(hyps, pairs["references"])["score"]
    assert start < 5
    assert score > 50, (score, hyps[:3])


# --------------------------------------------------------------------------- the CLI end to end


@pytest.mark.slow
def test_train_cli_end_to_end_writes_metrics_and_a_loadable_checkpoint(trained_run, session_cache_dir):
    run = trained_run
    assert run.rc == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [p["steps"] for p in summary["phases"]] == [30]

    events = read_jsonl(run.dir / "metrics.jsonl")
    for e in events:
        assert {"step", "split", "elapsed_s"} <= set(e), e
        assert e["split"] in ("train", "validation")
    train = [e for e in events if e["split"] == "train"]
    val = [e for e in events if e["split"] == "validation"]
    assert train and all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in train)
    assert train[-1]["step"] == 30
    assert [e["step"] for e in train] == sorted(e["step"] for e in train)
    assert all(math.isfinite(e["grad_norm"]) and e["lr"] > 0 for e in train)
    assert [e["step"] for e in val] == [0, 30]
    assert all(e["n"] == 64 and e["metric"] == "bleu" for e in val)
    elapsed = [e["elapsed_s"] for e in events]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0

    last = run.dir / "checkpoints" / "last"
    model = AutoModelForSeq2SeqLM.from_pretrained(last)
    tok = AutoTokenizer.from_pretrained(last)
    assert model.config.d_model == 32 and len(tok) <= 300
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 30
    assert json.loads((last / "mleps.json").read_text())["step"] == 30
    # MLEPS_CACHE_DIR was honoured by the subprocess
    assert list((session_cache_dir / "tokenizers").glob("multi30k_de_en-300-*/tokenizer.json"))


# --------------------------------------------------------------------------- bad inputs (exit 2)


@pytest.fixture
def pairs_file(tmp_path, multi30k_rows):
    """40 real pairs as a local JSONL file (the same content in every test: one cached tokenizer)."""
    return write_jsonl(tmp_path / "pairs.jsonl", [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:40]])


def _train_args(tmp_path, train_file, validation_file=None, *extra):
    return ["trainer=mle", *TINY_CLI, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=1000",
            "trainer.log_every=1", "trainer.save_every=1000", "data.max_eval_examples=4", "decode.max_new_tokens=8",
            "data=local", f"data.train_file={train_file}", f"data.validation_file={validation_file or train_file}",
            f"output_dir={tmp_path / 'run'}", *extra]


def _train(tmp_path, capfd, *args):
    return run_main("mleps.train", *args, capfd=capfd)


def test_missing_data_file_names_the_path_and_make_data(tmp_path, capfd):
    missing = tmp_path / "nope" / "train.jsonl"
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, missing))
    assert_user_error(code, err, str(missing), "make data")


@pytest.mark.slow
def test_missing_dataset_folder_in_a_real_process(tmp_path):
    """A fresh clone without `make data`: the default data config, as a real subprocess."""
    rc, _, err = run_cli("mleps.train", "trainer=mle", *TINY_CLI, f"data_dir={tmp_path / 'nodata'}",
                         f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_user_error(rc, err, str(tmp_path / "nodata" / "multi30k" / "train.jsonl"), "make data")


def test_empty_data_file(tmp_path, capfd, pairs_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, empty, pairs_file))
    assert_user_error(code, err, "empty", str(empty))


def test_a_column_that_does_not_exist_lists_the_columns_that_do(tmp_path, capfd, pairs_file):
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, pairs_file, None, "data.source_column=de"))
    assert_user_error(code, err, "'de'", "source, target")


@pytest.mark.parametrize("where", ["inside", "at_the_end"])
def test_non_utf8_bytes(tmp_path, capfd, pairs_file, where):
    bad = tmp_path / "latin1.jsonl"
    if where == "inside":  # a Latin-1 byte (0xDF) in a row
        tail = '{"source": "Stra\u00dfe", "target": "street"}\n'.encode("latin-1")
    else:  # the file stops inside a multi-byte character (a cut-off download)
        tail = '{"source": "Stra\u00dfe", "target": "str"}\n'.encode("utf-8") + b"\xc3"
    bad.write_bytes(pairs_file.read_bytes() + tail)
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, bad, pairs_file))
    assert_user_error(code, err, "UTF-8", str(bad))


def test_a_batch_larger_than_the_dataset(tmp_path, capfd, multi30k_rows):
    small = write_jsonl(tmp_path / "small.jsonl", [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:8]])
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, small, None, "trainer.batch_size=16"))
    assert_user_error(code, err, "trainer.batch_size", "(8 examples)")


@pytest.mark.parametrize("content", ["nothing", "config_only"])
def test_init_from_a_folder_without_model_files(tmp_path, capfd, pairs_file, content):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if content == "config_only":
        (ckpt / "config.json").write_text("{}")
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, pairs_file, None, f"init_from={ckpt}"))
    assert_user_error(code, err, str(ckpt), "no model files")


def test_blank_lines_and_empty_sources_are_skipped_with_a_count_in_the_log(tmp_path, capfd, caplog, pairs_file):
    lines = pairs_file.read_text(encoding="utf-8").splitlines()
    lines[3:3] = ["", json.dumps({"source": "", "target": "orphan"}), "  "]
    messy = tmp_path / "messy.jsonl"
    messy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    caplog.set_level(logging.INFO)
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, messy, pairs_file))
    assert code == 0, err
    assert "messy.jsonl: skipped 1 of 41 rows with an empty source or target" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()


def test_a_10000_token_example_is_truncated_with_a_count_in_the_log(tmp_path, capfd, caplog, multi30k_rows):
    rows = [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:40]]
    rows[5]["source"] = " ".join(["Hund"] * 10_000)
    f = write_jsonl(tmp_path / "long.jsonl", rows)
    caplog.set_level(logging.INFO)
    code, _, err = _train(tmp_path, capfd, *_train_args(tmp_path, f, None, "data.max_source_length=100"))
    assert code == 0, err
    assert "truncated 1 of 40 examples to 100 source / 128 target tokens" in caplog.text


def test_an_output_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capfd, pairs_file):
    args = _train_args(tmp_path, pairs_file)
    run = tmp_path / "run"
    code, _, err = _train(tmp_path, capfd, *args)
    assert code == 0, err
    first = read_jsonl(run / "metrics.jsonl")
    assert max(e["step"] for e in first) == 2

    code, _, err = _train(tmp_path, capfd, *args)
    assert_user_error(code, err, str(run), "resume=true", "overwrite=true")
    assert read_jsonl(run / "metrics.jsonl") == first  # untouched

    code, _, err = _train(tmp_path, capfd, *args, "resume=true", "trainer.max_steps=3")
    assert code == 0, err
    resumed = read_jsonl(run / "metrics.jsonl")
    assert resumed[:len(first)] == first
    assert [e["step"] for e in resumed[len(first):] if e["split"] == "train"] == [3]
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 3

    code, _, err = _train(tmp_path, capfd, *args, "overwrite=true")
    assert code == 0, err
    fresh = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in fresh if e["split"] == "train"] == [1, 2]
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 2



def test_patience_ends_the_phase_at_the_right_evaluation_and_keeps_the_best(tmp_path, capfd, pairs_file):
    """lr 0: no evaluation after step 0 can beat it, so patience 2 at eval_every 1 stops at step 2,
    with checkpoints/best from step 0; a resume of the finished run trains no further."""
    args = _train_args(tmp_path, pairs_file, None, "trainer.max_steps=10", "trainer.eval_every=1",
                       "trainer.lr=0.0", "trainer.patience=2")
    code, out, err = _train(tmp_path, capfd, *args)
    assert code == 0, err
    run = tmp_path / "run"
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if e["split"] == "validation"] == [0, 1, 2]
    stop = [e for e in events if e.get("event") == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 2 and stop[0]["best_step"] == 0
    assert "early stop at step 2" in out
    assert json.loads((run / "checkpoints" / "best" / "trainer_state.json").read_text())["step"] == 0
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 2
    assert '"early_stop_step": 2' in out
    assert json.loads((run / "summary.json").read_text())["phases"][0]["early_stop_step"] == 2

    code, _, err = _train(tmp_path, capfd, *args, "resume=true")
    assert code == 0, err
    assert read_jsonl(run / "metrics.jsonl") == events


def test_patience_counts_from_the_last_improvement(tmp_path, capfd, pairs_file):
    """A learning model improves for a while: the stop comes patience evaluations after the best one."""
    args = _train_args(tmp_path, pairs_file, None, "trainer.max_steps=40", "trainer.eval_every=2",
                       "trainer.lr=3e-3", "trainer.patience=2")
    code, _, err = _train(tmp_path, capfd, *args)
    assert code == 0, err
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    scores = [(e["step"], e["score"]) for e in events if e["split"] == "validation"]
    best_step, best = max(scores, key=lambda s: (s[1], -s[0]))  # the first step reaching the best score
    stop = [e for e in events if e.get("event") == "early_stop"]
    if stop:  # stopped: exactly two evaluations after the best, none of them better
        assert stop[0]["step"] == best_step + 4 == scores[-1][0]
    else:  # ran out of steps with fewer than two evaluations since the best
        assert scores[-1][0] - best_step < 4
    state = json.loads((tmp_path / "run" / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] == best_step and state["best_score"] == pytest.approx(best)


def test_select_by_cross_entropy_keeps_the_lowest_reference_cross_entropy(tmp_path, capfd, pairs_file):
    """eval.select=cross_entropy: checkpoints/best is the evaluation with the lowest references' cross-entropy,
    whatever the metric says (the MLE optimum, e.g. for a completion base model)."""
    args = _train_args(tmp_path, pairs_file, None, "trainer.max_steps=12", "trainer.eval_every=3",
                       "trainer.lr=3e-3", "eval.select=cross_entropy")
    code, _, err = _train(tmp_path, capfd, *args)
    assert code == 0, err
    evals = [e for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if e["split"] == "validation"]
    best = min(evals, key=lambda e: (e["cross_entropy"], e["step"]))
    assert best["step"] > 0  # training lowers it from the random start
    state = json.loads((tmp_path / "run" / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] == best["step"] and state["best_score"] == pytest.approx(best["cross_entropy"])
    code, _, err = _train(tmp_path, capfd, *args[:-1], "eval.select=perplexity", "overwrite=true")
    assert code == 2 and "eval.select=perplexity" in err

"""tiny_marian: the cached BPE tokenizer, and checkpoints that plain transformers can load."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianMTModel

from conftest import compose_cfg, write_jsonl
from mleps.checkpoint import save_checkpoint
from mleps.data import Collator, load_split, tokenize
from mleps.decoding import translate
from mleps.models import bpe_tokenizer, cache_dir, load_model_and_tokenizer


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mleps.models"]


def _forbid_training(monkeypatch):
    import tokenizers.trainers

    def boom(*a, **k):
        raise AssertionError("the tokenizer was retrained although a cached copy exists")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", boom)


def test_tokenizer_is_trained_once_then_loaded_from_the_session_cache(base_cfg, session_cache_dir, caplog,
                                                                      monkeypatch):
    cfg = base_cfg
    cfg.data.max_train_examples = 200  # a cache key no other test uses
    assert cfg.cache_dir is None and cache_dir() == session_cache_dir  # $MLEPS_CACHE_DIR, not ~/.cache
    ds = load_split(cfg.data, "train")
    caplog.set_level(logging.INFO, logger="mleps.models")

    before = set((session_cache_dir / "tokenizers").glob("*"))
    _, tok1, _ = load_model_and_tokenizer(cfg, ds)
    assert any(m.startswith("tokenizer: training a 300-token BPE on 200 pairs") for m in _messages(caplog))
    new = set((session_cache_dir / "tokenizers").glob("*")) - before
    assert len(new) == 1, new
    folder = new.pop()
    assert folder.name.startswith("multi30k_de_en-300-")
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    assert not list(folder.parent.glob("*.tmp*")), "temporary folders left behind"

    caplog.clear()
    _forbid_training(monkeypatch)
    _, tok2, _ = load_model_and_tokenizer(cfg, ds)
    assert _messages(caplog)[:1] == [f"tokenizer: reusing {folder}"]
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tok2.get_vocab() == tok1.get_vocab()
    text = ds[0]["source"] + " " + ds[0]["target"]
    assert tok2(text)["input_ids"] == tok1(text)["input_ids"]


def test_tokenizer_cache_key_follows_the_data_and_the_vocabulary(tmp_path, caplog):
    rows = [{"source": f"der Hund {i} läuft", "target": f"the dog {i} runs"} for i in range(30)]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    data = compose_cfg("data=local", f"data.train_file={f}").data
    root = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="mleps.models")

    def build(vocab):
        caplog.clear()
        tok = bpe_tokenizer(data, load_split(data, "train"), vocab, root)
        return tok, _messages(caplog)[0].split(":")[1].split()[0]  # "training" | "reusing"

    assert build(280)[1] == "training"
    assert build(280)[1] == "reusing"
    assert build(290)[1] == "training"  # another vocabulary size
    rows[3]["target"] = "a cat"
    write_jsonl(f, rows)  # same path, new content
    assert build(280)[1] == "training"
    assert len(list((root / "tokenizers").iterdir())) == 3


@pytest.mark.slow
def test_tokenizer_trained_by_the_cli_is_reused_in_process(trained_run, base_cfg, caplog, monkeypatch):
    """The training subprocess wrote the tokenizer into $MLEPS_CACHE_DIR; this process reuses it."""
    assert trained_run.rc == 0, trained_run.stderr[-3000:]
    cfg = base_cfg
    cfg.data.max_train_examples = 512  # the CLI run's slice
    caplog.set_level(logging.INFO, logger="mleps.models")
    _forbid_training(monkeypatch)
    _, tok, _ = load_model_and_tokenizer(cfg, load_split(cfg.data, "train"))
    assert any(m.startswith("tokenizer: reusing ") for m in _messages(caplog))
    saved = AutoTokenizer.from_pretrained(trained_run.dir / "checkpoints" / "last")
    assert saved.get_vocab() == tok.get_vocab()


def _tied(model) -> bool:
    ptr = model.get_input_embeddings().weight.data_ptr()
    return (model.get_output_embeddings().weight.data_ptr() == ptr
            and model.get_encoder().embed_tokens.weight.data_ptr() == ptr
            and model.get_decoder().embed_tokens.weight.data_ptr() == ptr)


def test_checkpoint_reloads_with_plain_transformers_identically_and_stays_tied(base_cfg, tmp_path):
    from accelerate import Accelerator

    from mleps.trainers.mle import MLE

    cfg = base_cfg
    torch.manual_seed(0)
    train = load_split(cfg.data, "train")
    model, tok, prefix = load_model_and_tokenizer(cfg, train)
    assert isinstance(model, MarianMTModel) and _tied(model)
    # Train a little so the weights (and the tied embedding) are no longer the initialisation.
    rows = tokenize(train, tok, cfg.data)[:16]
    batch = Collator(tok, model)(rows)
    rule = MLE(cfg=cfg.trainer, model=model, tokenizer=tok, metric=None, accelerator=Accelerator(cpu=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        opt.zero_grad()
        rule.step(batch, step)
        opt.step()
    assert _tied(model)

    folder = save_checkpoint(tmp_path / "ckpt", model, tok, {"source_prefix": prefix}, state={"step": 5})
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 5}
    assert json.loads((folder / "mleps.json").read_text()) == {"source_prefix": ""}
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(folder)
    rtok = AutoTokenizer.from_pretrained(folder)
    assert isinstance(reloaded, MarianMTModel)
    assert _tied(reloaded), "embeddings untied after reload"
    assert reloaded.config.tie_word_embeddings
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k

    sources = load_split(cfg.data, "validation")["source"][:16]
    assert rtok(sources)["input_ids"] == tok(sources)["input_ids"]
    assert (rtok.pad_token_id, rtok.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    model.eval()
    a = translate(model, tok, sources, cfg.decode)
    b = translate(reloaded, rtok, sources, cfg.decode)
    assert a == b
    assert any(a), "every hypothesis is empty: the comparison says nothing"

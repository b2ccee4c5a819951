"""model=hf: a tiny randomly initialised T5 built locally (no downloads) trains with MGS and
MLE through the CLI, and its checkpoint evaluates."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from conftest import run_cli, write_jsonl
from test_mgs import make_batch, mgs_rule, pairs, word_tokenizer


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_data")
    src, tgt = pairs(64, seed=1)
    rows = [{"source": s, "target": t} for s, t in zip(src, tgt)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "dev.jsonl", rows[:16])
    return folder


def test_mgs_step_on_t5_moves_parameters_and_copy_equals_inplace(tiny_t5):
    tokenizer = word_tokenizer()
    grads = {}
    for perturb in ("inplace", "copy"):
        model = T5ForConditionalGeneration.from_pretrained(tiny_t5)
        before = [p.detach().clone() for p in model.parameters()]
        rule = mgs_rule(model, tokenizer, perturb=perturb)
        rule.step(make_batch(tokenizer, model), step=2)
        grads[perturb] = [p.grad.clone() for p in model.parameters()]
        rule.apply(rule.optimizer)
        changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed == len(before), f"only {changed} of {len(before)} T5 tensors changed"
    assert all(torch.equal(a, b) for a, b in zip(grads["inplace"], grads["copy"]))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["mgs", "mle"])
def test_hf_t5_trains_through_the_cli_and_evaluates(tiny_t5, toy_data, tmp_path, trainer):
    run_dir = tmp_path / "run"
    data = ["data=local", f"data.train_file={toy_data / 'train.jsonl'}",
            f"data.validation_file={toy_data / 'dev.jsonl'}", f"data.test_file={toy_data / 'dev.jsonl'}"]
    code, out, err = run_cli(
        "mleps.train", "model=hf", f"model.name_or_path={tiny_t5}", f"trainer={trainer}", *data,
        "trainer.warm_start_steps=0", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.eval_every=2",
        "decode.max_new_tokens=8", "progress=false", f"output_dir={run_dir}")
    assert code == 0, err[-2000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["split"] == "validation"] == [0, 2]
    code, out, err = run_cli("mleps.evaluate", f"checkpoint={run_dir / 'checkpoints' / 'last'}", *data,
                             "split=test", "decode.max_new_tokens=8", "progress=false")
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 16 and result["metric"] == "bleu"

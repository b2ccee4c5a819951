"""Tests for trainer=pg: the REINFORCE gradient, learning a rewarded token, the LOO baseline.

A 1-layer MarianMTModel (d_model 16) over a 20-word vocabulary, no downloads; metrics are stubs
that score the decoded words. test_mrt.py imports the helpers from here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import mleps.trainers.pg as pg
from mleps.config import PGConfig
from mleps.data import Collator
from mleps.decoding import generate, to_texts
from mleps.metrics import Metric
from mleps.models import tiny_marian

PAD, EOS = 0, 2  # the decoder start token is PAD, as in Marian
WORDS = [f"w{i}" for i in range(3, 20)]
SOURCES = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
TARGETS = ["w12 w13", "w14 w15 w16", "w17"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<unk>": 1, "</s>": EOS, **{w: i for i, w in enumerate(WORDS, start=3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = SimpleNamespace(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0)
    return tiny_marian(cfg, tokenizer)


def make_batch(tokenizer, model, sources=SOURCES, targets=TARGETS) -> dict:
    rows = {"input_ids": tokenizer(sources)["input_ids"], "labels": tokenizer(text_target=targets)["input_ids"],
            "source": sources, "references": [[t] for t in targets]}
    return Collator(tokenizer, model)(rows)


class WordMetric(Metric):
    """Sentence score: 100 × the share of a hypothesis's words that are `word` (or a fixed table)."""

    def __init__(self, word="w7"):
        self.word = word
        self.calls = []

    def sentence_scores(self, hyps, refs):
        self.calls.append((list(hyps), [list(r) for r in refs]))
        return [100.0 * h.split().count(self.word) / max(len(h.split()), 1) for h in hyps]


class LengthMetric(Metric):
    """Distinct rewards for the fixed samples below: 100 / (1 + words), plus 10 if w5 is in it."""

    def sentence_scores(self, hyps, refs):
        return [100.0 / (1 + len(h.split())) + 10.0 * ("w5" in h.split()) for h in hyps]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads cost more than they save (3x here), and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def make_rule(cls, schema, tokenizer, model, metric, accelerator, **overrides):
    cfg = OmegaConf.structured(schema(**{"max_new_tokens": 6, "mle_mix": 0.0, **overrides}))
    return cls(cfg=cfg, model=model, tokenizer=tokenizer, metric=metric, accelerator=accelerator, seed=0)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def hand_log_prob(model, source_ids: list[int], output: list[int]) -> torch.Tensor:
    """log p(output|source) token by token on unpadded tensors, stopping after the first EOS."""
    end = output.index(EOS, 1) + 1 if EOS in output[1:] else len(output)
    output = output[:end]
    logits = model(input_ids=torch.tensor([source_ids]), decoder_input_ids=torch.tensor([output[:-1]])).logits[0]
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t, output[t + 1]] for t in range(len(output) - 1))


def unpadded_sources(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


# Two samples per source, of every shape: early EOS, padding after EOS, immediate EOS, no EOS (cut off).
FIXED_SAMPLES = torch.tensor([
    [PAD, 5, 7, EOS, PAD, PAD, PAD],
    [PAD, 9, EOS, PAD, PAD, PAD, PAD],
    [PAD, 4, 4, 4, 4, 4, 4],
    [PAD, EOS, PAD, PAD, PAD, PAD, PAD],
    [PAD, 5, 6, 8, 10, EOS, PAD],
    [PAD, 5, 7, EOS, PAD, PAD, PAD],
])


# -- 1. autograd's gradient = the REINFORCE estimator written out ---------------------------------

@pytest.mark.parametrize("baseline,standardize", [("loo", False), ("none", False), ("greedy", False), ("loo", True)])
def test_gradient_equals_hand_reinforce(monkeypatch, accelerator, baseline, standardize):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model)
    k = 2
    monkeypatch.setattr(pg, "sample", lambda *a, **kw: FIXED_SAMPLES.clone())
    rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, LengthMetric(), accelerator,
                     num_samples=k, baseline=baseline, standardize=standardize)
    model.train()
    stats = rule.step(batch, step=0)
    autograd = grads(model)

    # By hand: rewards, baselines, then Σ_n (r_n - b_n) ∇log p(y_n|x_n), one backward per sample.
    texts = to_texts(tokenizer, FIXED_SAMPLES)
    rewards = torch.tensor(LengthMetric().sentence_scores(texts, None)).view(3, k) / 100
    if baseline == "loo":
        base = torch.stack([rewards[:, 1], rewards[:, 0]], 1)  # K = 2: the other sample's reward
    elif baseline == "greedy":
        greedy = to_texts(tokenizer, generate(model, batch, max_new_tokens=6))
        base = (torch.tensor(LengthMetric().sentence_scores(greedy, None)) / 100).unsqueeze(1).expand(3, k)
    else:
        base = torch.zeros(3, k)
    advantages = (rewards - base).flatten()
    if standardize:
        advantages = advantages / advantages.square().mean().sqrt()
    model.zero_grad()
    sources = unpadded_sources(batch)
    for n, output in enumerate(FIXED_SAMPLES.tolist()):
        log_p = hand_log_prob(model, sources[n // k], output)
        (-advantages[n] * log_p / len(advantages)).backward()
    by_hand = grads(model)

    assert stats["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert stats["baseline_mean"] == pytest.approx(base.mean().item(), abs=1e-6)
    assert stats["sample_len"] == pytest.approx((3 + 2 + 6 + 1 + 5 + 3) / 6)
    assert stats["distinct_per_source"] == pytest.approx(2.0)
    assert sum(float(g.abs().sum()) for g in by_hand) > 1e-3  # the comparison is not between zeros
    for a, h in zip(autograd, by_hand):
        torch.testing.assert_close(a, h, atol=1e-6, rtol=1e-4)


def test_mle_mix_adds_the_cross_entropy_gradient(monkeypatch, accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model)
    monkeypatch.setattr(pg, "sample", lambda *a, **kw: FIXED_SAMPLES.clone())
    per_mix = {}
    for mix in (0.0, 0.5):
        rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, LengthMetric(), accelerator,
                         num_samples=2, mle_mix=mix)
        model.zero_grad()
        per_mix[mix] = (rule.step(batch, 0), grads(model))
    model.zero_grad()
    model(**{k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels")}).loss.backward()
    for g0, g5, ce in zip(per_mix[0.0][1], per_mix[0.5][1], grads(model)):
        torch.testing.assert_close(g5 - g0, 0.5 * ce, atol=1e-6, rtol=1e-4)
    stats = per_mix[0.5][0]
    assert stats["loss"] == pytest.approx(stats["pg_loss"] + 0.5 * stats["cross_entropy"], rel=1e-6)


# -- 2. a reward for one token raises that token's probability ----------------------------------

def first_token_prob(model, batch, token: int) -> float:
    with torch.no_grad():
        start = torch.full((len(batch["input_ids"]), 1), PAD)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=start).logits
    return float(logits[:, 0].softmax(-1)[:, token].mean())


def test_pg_steps_raise_the_rewarded_token(accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model)
    w7 = tokenizer.convert_tokens_to_ids("w7")
    metric = WordMetric("w7")
    rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, metric, accelerator, num_samples=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    before = first_token_prob(model, batch, w7)
    rewards = []
    for step in range(8):
        optimizer.zero_grad()
        model.train()
        stats = rule.step(batch, step)
        assert all(isinstance(v, float) for v in stats.values())
        rewards.append(stats["reward_mean"])
        optimizer.step()
    after = first_token_prob(model, batch, w7)
    print(f"p(w7 first) {before:.3f} -> {after:.3f}; reward by step {[round(r, 3) for r in rewards]}")
    assert after > 3 * before
    assert sum(rewards[-3:]) > 2 * sum(rewards[:3])
    # The metric saw K copies of each source's references, in generate's order.
    assert metric.calls[0][1] == [[t] for t in TARGETS for _ in range(8)]


def test_samples_are_a_function_of_the_step(accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model)
    metric = WordMetric()
    rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, metric, accelerator, num_samples=4)
    for step in (3, 4, 3):
        torch.manual_seed(step + 100)  # whatever the global RNG holds, the step seed decides
        model.zero_grad()
        rule.step(batch, step)
    assert metric.calls[0][0] == metric.calls[2][0]
    assert metric.calls[0][0] != metric.calls[1][0]


# -- 3. the leave-one-out baseline: unbiased, lower variance ------------------------------------

def reinforce_estimates(theta, rewards, k, replicates, baseline, seed=0):
    """(replicates, C) REINFORCE gradient estimates of the loss for a categorical policy softmax(theta),
    each from K samples, by one backward through pg.reinforce_loss: every replicate owns a copy of theta."""
    thetas = theta.detach().expand(replicates, -1).clone().requires_grad_()
    probs = theta.detach().softmax(-1).expand(replicates, -1)
    draws = torch.multinomial(probs, k, replacement=True, generator=torch.Generator().manual_seed(seed))
    log_probs = thetas.log_softmax(-1).gather(1, draws)
    r = rewards[draws]
    b = baseline(r)
    pg.reinforce_loss(log_probs.flatten(), (r - b).flatten()).backward()
    return thetas.grad * replicates  # the loss averages over replicates; undo it


def test_leave_one_out_is_unbiased_with_lower_variance():
    theta = torch.tensor([0.5, -0.2, 0.1, 0.8, -1.0], dtype=torch.float64)
    rewards = torch.tensor([0.9, 0.6, 0.75, 0.8, 0.3], dtype=torch.float64)
    p = theta.softmax(-1)
    true_grad = -p * (rewards - p @ rewards)  # ∇ of the loss -E_p[r]
    k, n = 4, 20000
    baselines = {
        "none": lambda r: torch.zeros_like(r),
        "loo": pg.leave_one_out,
        "mean incl. self": lambda r: r.mean(1, keepdim=True),  # biased by (K-1)/K: the test can tell
    }
    results = {}
    for name, baseline in baselines.items():
        est = reinforce_estimates(theta, rewards, k, n, baseline)
        mean, var = est.mean(0), est.var(0).sum()
        z = ((mean - true_grad) / (est.std(0) / n**0.5)).abs().max()
        results[name] = (mean, var, z)
        print(f"{name:15s} total variance {var:.5f}  max |z| vs true gradient {z:.2f}  mean {mean.numpy().round(4)}")
    print(f"{'true':15s} {true_grad.numpy().round(4)}")
    assert results["none"][2] < 4 and results["loo"][2] < 4
    assert results["mean incl. self"][2] > 6
    assert results["loo"][1] < 0.2 * results["none"][1]


def test_baseline_needs_two_samples(accelerator):
    from mleps.errors import UserError

    tokenizer = tiny_tokenizer()
    with pytest.raises(UserError, match="num_samples"):
        make_rule(pg.PolicyGradient, PGConfig, tokenizer, tiny_model(tokenizer), WordMetric(), accelerator,
                  num_samples=1, baseline="loo")


# -- 5. end to end ---------------------------------------------------------------------------------

def run_train(trainer: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("MLEPS_DATA_DIR") or root / "data")
    if not (data / "multi30k" / "train.jsonl").is_file():
        pytest.skip(f"no multi30k under {data}: run `make data` or set MLEPS_DATA_DIR")
    cmd = [sys.executable, "-m", "mleps.train", f"trainer={trainer}", "trainer.max_steps=2", "trainer.batch_size=4",
           "trainer.num_samples=2", "trainer.max_new_tokens=8", "trainer.eval_every=2", "trainer.log_every=1",
           "data.max_train_examples=32", "data.max_eval_examples=4", "decode.max_new_tokens=8",
           "model.vocab_size=300", "model.d_model=16", "model.layers=1", "model.heads=2", "model.ffn_dim=32",
           f"data_dir={data}", f"output_dir={tmp_path / trainer}", f"cache_dir={tmp_path / 'cache'}",
           "progress=false", "cpu=true", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_train_pg_end_to_end(tmp_path):
    done = run_train("pg", tmp_path, "trainer.baseline=greedy", "trainer.standardize=true")
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "pg" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in train] == [1, 2]
    assert {"reward_mean", "baseline_mean", "advantage_std", "sample_s", "grad_norm"} <= set(train[0])

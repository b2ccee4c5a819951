"""GRPO in the pg rule (trainer=grpo): group advantages and their scaling, the k3 KL penalty to the
phase's start model, its exact resume, end-to-end runs and the start-up checks.

The rule-level tests reuse test_pg.py's tiny Marian, tokenizer, fixed samples and stub metrics.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import mleps.trainers.pg as pg
from conftest import TINY_CLI, assert_user_error, run_main
from mleps.config import PGConfig
from test_pg import (FIXED_SAMPLES, LengthMetric, WordMetric, grads, hand_log_prob, make_batch, make_rule,
                     tiny_model, tiny_tokenizer, unpadded_sources)
from test_pg import accelerator, one_thread  # noqa: F401  (fixtures)

# -- 1. advantages: r - the group mean, divided by std + 1e-4 (TRL's GRPOTrainer) ---------------

REWARDS = torch.tensor([[0.1, 0.5, 0.9, 0.5],
                        [0.3, 0.3, 0.3, 0.3]])  # the second group has no spread


def centred(rewards):
    return rewards - rewards.mean(1, keepdim=True)


def test_group_scaling_by_hand():
    """Group 1: mean 0.5, deviations (-0.4, 0, 0.4, 0), unbiased std sqrt(0.32 / 3). Group 2: all equal,
    so its advantages are 0 / (0 + 1e-4) = 0 (up to float32 rounding of the mean), not NaN."""
    got = pg.scale_rewards(centred(REWARDS), REWARDS, "group")
    std = math.sqrt(0.32 / 3)
    want = torch.tensor([[-0.4 / (std + 1e-4), 0.0, 0.4 / (std + 1e-4), 0.0], [0.0] * 4])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.isfinite().all() and got[1].abs().max() < 1e-3


def test_batch_scaling_by_hand():
    """All 8 rewards: mean 0.4, squared deviations summing to 0.40, unbiased std sqrt(0.40 / 7); each
    reward is still centred on its own group's mean."""
    got = pg.scale_rewards(centred(REWARDS), REWARDS, "batch")
    std = math.sqrt(0.40 / 7)
    want = torch.tensor([[-0.4, 0.0, 0.4, 0.0], [0.0] * 4]) / (std + 1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = torch.tensor([[0.7]])  # a single reward has no std: divided by 1e-4 alone, and 0 stays 0
    assert pg.scale_rewards(one - one, one, "batch").item() == 0.0


def test_no_scaling_leaves_the_centred_rewards():
    advantages = centred(REWARDS)
    assert pg.scale_rewards(advantages, REWARDS, "none") is advantages
    torch.testing.assert_close(advantages[0], torch.tensor([-0.4, 0.0, 0.4, 0.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_baseline_gradient_equals_hand_reinforce(monkeypatch, accelerator, scale):  # noqa: F811
    """baseline=group through the rule's step: autograd's gradient is Σ_n A_n ∇log p(y_n|x_n) / N with
    the advantages above, one backward per sample (K = 2 fixed samples per source)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = make_batch(tokenizer, model)
    monkeypatch.setattr(pg, "sample", lambda *a, **kw: FIXED_SAMPLES.clone())
    rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, LengthMetric(), accelerator,
                     num_samples=2, baseline="group", scale_rewards=scale)
    model.train()
    stats = rule.step(batch, step=0)
    autograd = grads(model)

    from mleps.decoding import to_texts
    rewards = torch.tensor(LengthMetric().sentence_scores(to_texts(tokenizer, FIXED_SAMPLES), None)).view(3, 2) / 100
    advantages = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (rewards.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    advantages = advantages.flatten()
    model.zero_grad()
    sources = unpadded_sources(batch)
    for n, output in enumerate(FIXED_SAMPLES.tolist()):
        (-advantages[n] * hand_log_prob(model, sources[n // 2], output) / len(advantages)).backward()
    assert stats["baseline_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert "kl" not in stats and rule.reference is None  # kl_coef = 0: no frozen copy
    assert sum(float(g.abs().sum()) for g in grads(model)) > 1e-3
    for a, h in zip(autograd, grads(model)):
        torch.testing.assert_close(a, h, atol=1e-6, rtol=1e-4)


# -- 2. the k3 KL estimator -------------------------------------------------------------------------

def test_k3_by_hand_and_zero_at_the_reference():
    """Row 1: policy (1/2, 1/4), reference (1/4, 1/2) on its two tokens: k3 = e^d - d - 1 with d = -log 2,
    then +log 2: (1/2 + log 2 - 1) + (2 - log 2 - 1) = 1/2 over two tokens, mean 1/4. Row 2: equal
    log-probs, 0; its padding (masked) never counts."""
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.5), 0.0, -7.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0], [math.log(0.5), 0.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(pg.k3_kl(log_probs, ref, mask), torch.tensor([0.25, 0.0]))
    assert torch.equal(pg.k3_kl(log_probs, log_probs, mask), torch.zeros(2))


def test_k3_is_an_unbiased_estimate_of_kl_on_policy_samples():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k3 = pg.k3_kl(p.log()[draws].unsqueeze(1), q.log()[draws].unsqueeze(1), torch.ones(len(draws), 1, dtype=torch.bool))
    kl = float((p * (p / q).log()).sum())
    assert float(k3.mean()) == pytest.approx(kl, abs=4 * float(k3.std()) / len(draws) ** 0.5)
    assert float(k3.min()) >= 0


def first_token_kl(model, reference, batch) -> float:
    """The exact KL(model || reference) of the first output token's distribution, averaged over sources."""
    start = torch.zeros(len(batch["input_ids"]), 1, dtype=torch.long)
    with torch.no_grad():
        logp, logq = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=start).logits[:, 0].log_softmax(-1) for m in (model, reference))
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_the_penalty_is_silent_at_the_start_and_then_pulls_back_to_the_reference(accelerator):  # noqa: F811
    """At the start model the k3 term and its gradient are 0 (d/dlogp of e^(ref-logp) - (ref-logp) - 1 is
    1 - e^(ref-logp) = 0), so step 0's gradient is pg's. Trained on one rewarded word for the same steps
    and seed, the run with the penalty ends closer to the start model than the run without."""
    tokenizer = tiny_tokenizer()
    batch = make_batch(tokenizer, tiny_model(tokenizer))
    runs = {}
    for kl_coef in (0.0, 1.0):
        model = tiny_model(tokenizer)
        start = tiny_model(tokenizer).eval()
        rule = make_rule(pg.PolicyGradient, PGConfig, tokenizer, model, WordMetric("w7"), accelerator,
                         num_samples=8, baseline="group", scale_rewards="group", kl_coef=kl_coef)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        kls = []
        for step in range(6):
            optimizer.zero_grad()
            model.train()
            stats = rule.step(batch, step)
            if step == 0:
                first = grads(model)
            kls.append(stats.get("kl"))
            optimizer.step()
        runs[kl_coef] = (first, kls, first_token_kl(model, start, batch))
    for a, b in zip(runs[0.0][0], runs[1.0][0]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert runs[0.0][1] == [None] * 6 and runs[1.0][1][0] == 0.0 and runs[1.0][1][-1] > 0
    print(f"first-token KL to the start after 6 steps: no penalty {runs[0.0][2]:.4f}, kl_coef=1 {runs[1.0][2]:.4f}")
    assert runs[0.0][2] > 1e-3
    assert runs[1.0][2] < 0.7 * runs[0.0][2]


def test_a_given_start_model_is_the_reference(accelerator):  # noqa: F811
    """A resumed run hands the rule the phase's first weights: the rule must not copy the model it trains."""
    tokenizer = tiny_tokenizer()
    model, start = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    cfg = PGConfig(max_new_tokens=6, mle_mix=0.0, kl_coef=0.1)
    from omegaconf import OmegaConf
    rule = pg.PolicyGradient(cfg=OmegaConf.structured(cfg), model=model, tokenizer=tokenizer, metric=WordMetric(),
                             accelerator=accelerator, start_model=start)
    assert rule.reference is start and not start.training
    assert not any(p.requires_grad for p in start.parameters())
    assert pg.PolicyGradient.needs_start_model(cfg) and not pg.PolicyGradient.needs_start_model(PGConfig())


# -- 3. through the CLI: 2 steps on both families, exact resume, start-up checks -----------------

# An untrained model's samples all score the same (BLEU 0, edit distance 1), and a group of equal rewards
# has no gradient: the MLE mix moves the weights away from the reference, so the KL term has work to do.
GRPO = ["trainer=grpo", "metric=edit", "trainer.mle_mix=0.5", *TINY_CLI, "trainer.batch_size=4", "trainer.num_samples=2",
        "trainer.max_new_tokens=8", "trainer.log_every=1", "trainer.eval_every=100", "trainer.save_every=1", "trainer.lr=1e-2",
        "data.max_train_examples=32", "data.max_eval_examples=4", "decode.max_new_tokens=8"]


def train_events(run):
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == "train"]


def straight_run(run, capfd):
    code, _, err = run_main("mleps.train", *GRPO, "trainer.max_steps=2", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_grpo_trains_tiny_marian(tmp_path, capfd, data_dir):
    last = straight_run(tmp_path / "run", capfd)
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [1, 2] and events[0]["kl"] == 0.0 and events[1]["kl"] > 0
    start = load_file(tmp_path / "run" / "checkpoints" / "main_start" / "model.safetensors")
    assert sum(not torch.equal(start[k], last[k]) for k in last) > len(last) // 2, "the weights trained"


@pytest.mark.slow
def test_grpo_resumes_with_the_same_reference(tmp_path, capfd, data_dir):
    """Two steps straight, against one step, a stop, and a resume for the second: bit-identical weights.
    The resumed run's reference must be the phase's start (checkpoints/main_start), not the step-1 weights
    it resumes from, or the second step's KL gradient differs."""
    last = straight_run(tmp_path / "straight", capfd)
    resumed = tmp_path / "resumed"
    code, _, err = run_main("mleps.train", *GRPO, "trainer.max_steps=1", f"output_dir={resumed}", capfd=capfd)
    assert code == 0, err
    code, _, err = run_main("mleps.train", *GRPO, "trainer.max_steps=2", "resume=true", f"output_dir={resumed}",
                            capfd=capfd)
    assert code == 0, err
    again = load_file(resumed / "checkpoints" / "last" / "model.safetensors")
    for k in last:
        assert torch.equal(again[k], last[k]), k


def test_grpo_trains_tiny_gpt2(tmp_path, capfd, data_dir):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *GRPO, "data=completion", "model=tiny_gpt2", "data.prefix_tokens=5",
                            "data.continuation_tokens=8", "trainer.max_steps=2", f"output_dir={run}",
                            capfd=capfd)
    assert code == 0, err
    events = train_events(run)
    assert [e["step"] for e in events] == [1, 2] and events[1]["kl"] > 0
    start = load_file(run / "checkpoints" / "main_start" / "model.safetensors")
    last = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert any(not torch.equal(start[k], last[k]) for k in last)


@pytest.mark.parametrize("overrides,needle", [
    (["trainer.kl_coef=-0.1"], "trainer.kl_coef=-0.1"),
    (["trainer.num_samples=1"], "needs trainer.num_samples >= 2"),
    (["trainer.baseline=none", "trainer.num_samples=1"], "trainer.scale_rewards=group"),
    (["trainer.scale_rewards=std"], "trainer.scale_rewards=std"),
])
def test_bad_grpo_options_stop_at_start(tmp_path, capfd, overrides, needle):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", "trainer=grpo", *TINY_CLI, *overrides, f"output_dir={run}", capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (run / "metrics.jsonl").exists()

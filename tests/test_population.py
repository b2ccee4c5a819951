"""Batched population decoding (mleps.population, trainer.decode_population=batched): one `generate`
over P parameter sets returns, for every set, the ids a decode with that set alone returns, token
for token (tiny Marian and tiny T5, CPU, float32); MGS's losses and update are those of sequential
decoding; an unsupported module is one clear error; the model comes back unchanged; the extra
memory is the stacked parameters.

Tolerances: on CPU the population forms round as the modules they replace (the same gemm per group,
LayerNorm's affine as one addcmul), so logits agree to 0 here; the tests allow 1e-6 for the logits
and the update, and demand equal tokens and equal losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from transformers import T5Config, T5ForConditionalGeneration

from conftest import allocated_peak
from mleps import population
from mleps.config import MLEConfig
from mleps.decoding import generate
from mleps.errors import UserError
from mleps.search import SearchConfig, apply_perturbation_, draw_samples
from mleps.trainers import build_rule
from test_mgs import make_batch, mgs_rule, tiny_model, word_tokenizer

torch.set_num_threads(1)


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=len(word_tokenizer()), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0))


MODELS = {"marian": tiny_model, "t5": tiny_t5}
NOISE = {"marian": 0.05, "t5": 1.0}  # σ at which the K+1 greedy outputs differ (T5's init is small)


def perturbed_stacks(params, size: int, scale: float = 0.05, seed: int | None = None) -> list[torch.Tensor]:
    """Group 0 = θ, groups 1… = θ + constant-σ noise, as MGS builds them."""
    cfg = SearchConfig(num_samples=size - 1, proposal="zero", noise_mode="constant", noise_scale=scale)
    stacks = population.stack_parameters(params, size)
    for group, sample in enumerate(draw_samples(cfg, torch.Generator().manual_seed(size if seed is None else seed)), start=1):
        apply_perturbation_([s[group] for s in stacks], None, cfg, sample)
    return stacks


def sequential(model, params, stacks, fn):
    """fn(model) with the live parameters set to each group in turn; θ restored afterwards."""
    theta = [p.detach().clone() for p in params]
    out = []
    with torch.no_grad():
        for group in range(stacks[0].shape[0]):
            for p, s in zip(params, stacks):
                p.copy_(s[group])
            out.append(fn(model))
        for p, t in zip(params, theta):
            p.copy_(t)
    return out


def logits(model, batch, size: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].repeat(size, 1), attention_mask=batch["attention_mask"].repeat(size, 1),
                     decoder_input_ids=batch["decoder_input_ids"].repeat(size, 1)).logits


@pytest.mark.parametrize("name", MODELS)
def test_batched_decode_equals_sequential_decodes_token_for_token(name):
    tokenizer = word_tokenizer()
    model = MODELS[name]()
    batch = make_batch(tokenizer, model)
    params = [p for p in model.parameters() if p.requires_grad]
    stacks = perturbed_stacks(params, 5, NOISE[name])
    with population.population(model, dict(zip(params, stacks))):
        batched = population.decode(model, batch, 5, max_new_tokens=12)
        batched_logits = logits(model, batch, 5).chunk(5)
    wanted = sequential(model, params, stacks, lambda m: generate(m, batch, max_new_tokens=12))
    wanted_logits = sequential(model, params, stacks, lambda m: logits(m, batch))
    assert len({tuple(w.flatten().tolist()) for w in wanted}) == 5, "the perturbations change the outputs"
    for group, (got, want) in enumerate(zip(batched, wanted)):
        assert torch.equal(got, want), f"group {group}: {got.tolist()} != {want.tolist()}"
        torch.testing.assert_close(batched_logits[group], wanted_logits[group], rtol=0, atol=1e-6)


def test_groups_that_end_early_are_cut_where_their_own_decode_stops():
    """A group whose rows all end early is returned as short as its own decode (not padded to the others)."""
    tokenizer = word_tokenizer()
    model = tiny_model()
    batch = make_batch(tokenizer, model)
    params = [p for p in model.parameters() if p.requires_grad]
    stacks = perturbed_stacks(params, 5, seed=0)
    with population.population(model, dict(zip(params, stacks))):
        batched = population.decode(model, batch, 5, max_new_tokens=12)
    wanted = sequential(model, params, stacks, lambda m: generate(m, batch, max_new_tokens=12))
    assert all(torch.equal(g, w) for g, w in zip(batched, wanted))
    lengths = [ids.shape[1] for ids in batched]
    assert min(lengths) < max(lengths), lengths  # the case is exercised (group 2 stops after 3 tokens here)


def test_beams_and_returned_sequences_keep_each_groups_rows_together():
    """Beam search expands and reorders rows within a source's beams, so groups stay contiguous."""
    tokenizer = word_tokenizer()
    model = tiny_model()
    batch = make_batch(tokenizer, model, n=6)
    params = [p for p in model.parameters() if p.requires_grad]
    stacks = perturbed_stacks(params, 3)
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2)
    with population.population(model, dict(zip(params, stacks))):
        batched = population.decode(model, batch, 3, **kwargs)
    wanted = sequential(model, params, stacks, lambda m: generate(m, batch, **kwargs))
    for got, want in zip(batched, wanted):
        assert got.shape[0] == 12 and torch.equal(got, want)


def test_the_model_comes_back_unchanged_even_after_an_error():
    model = tiny_t5()
    batch = make_batch(word_tokenizer(), model)
    before = logits(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="not a whole number of groups"):
        with population.population(model, dict(zip(params, perturbed_stacks(params, 3)))):
            logits(model, batch)  # 16 rows for 3 groups
    assert not any("forward" in m.__dict__ or "compute_bias" in m.__dict__ for m in model.modules())
    assert all(not h for m in model.modules() for h in (m._forward_pre_hooks, m._forward_hooks))
    assert torch.equal(logits(model, batch), before)


def test_an_unperturbed_subset_is_shared_and_still_exact():
    """Freezing the encoder: only the trainable tensors are stacked; frozen modules keep their forward."""
    tokenizer = word_tokenizer()
    model = tiny_model()
    batch = make_batch(tokenizer, model)
    for p in model.model.encoder.layers.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    stacks = perturbed_stacks(params, 4)
    with population.population(model, dict(zip(params, stacks))):
        encoder_layer = model.model.encoder.layers[0]
        assert not any("forward" in m.__dict__ for m in encoder_layer.modules())  # shared
        assert "forward" in model.model.decoder.layers[0].fc1.__dict__
        batched = population.decode(model, batch, 4, max_new_tokens=12)
    wanted = sequential(model, params, stacks, lambda m: generate(m, batch, max_new_tokens=12))
    assert all(torch.equal(g, w) for g, w in zip(batched, wanted))


class Scale(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.gain = inner, torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.inner(x) * self.gain


def test_an_unsupported_parametrised_module_is_one_clear_error():
    tokenizer = word_tokenizer()
    model = tiny_model()
    model.model.decoder.layers[0].fc2 = Scale(model.model.decoder.layers[0].fc2)
    with pytest.raises(UserError) as e:
        mgs_rule(model, tokenizer, decode_population="batched")
    message = str(e.value)
    assert "\n" not in message and "Scale" in message and "model.decoder.layers.0.fc2" in message
    assert "decode_population=sequential" in message
    model.model.decoder.layers[0].fc2.gain.requires_grad_(False)  # frozen: shared by all groups, no error
    mgs_rule(model, tokenizer, decode_population="batched")


def test_batched_decoding_with_sampling_is_refused():
    with pytest.raises(UserError, match="decode=greedy"):
        mgs_rule(tiny_model(), word_tokenizer(), decode_population="batched", decode="sample")


@pytest.mark.parametrize("name,guide", [("marian", "optimizer"), ("marian", "scaled"), ("t5", "optimizer")])
def test_mgs_losses_and_update_equal_sequential_decoding(name, guide):
    tokenizer = word_tokenizer()
    results = {}
    for mode in ("sequential", "batched"):
        model = MODELS[name]()
        batch = make_batch(tokenizer, model)
        rule = mgs_rule(model, tokenizer, decode_population=mode, guide=guide, guide_scale=0.1,
                        apply="sgd" if guide == "optimizer" else "optimizer", num_samples=4,
                        noise_mode="constant", noise_scale=NOISE[name])
        losses = []
        real = rule.metric.loss_from_stats
        rule.metric.loss_from_stats = lambda stats: losses.append(real(stats)) or losses[-1]
        stats = rule.step(batch, step=3)
        results[mode] = (losses, stats, [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (seq_losses, seq_stats, seq_grads), (bat_losses, bat_stats, bat_grads) = results["sequential"], results["batched"]
    assert len(bat_losses) == 5 and len(set(bat_losses)) > 1, bat_losses  # C(θ) and four distinct C(θ+Δ_k)
    np.testing.assert_allclose(bat_losses, seq_losses, rtol=0, atol=1e-6)
    for key in ("task_loss", "perturbed_loss_mean", "ess", "update_norm", "noise_norm"):
        assert bat_stats[key] == pytest.approx(seq_stats[key], abs=1e-6), key
    assert max(float((a - b).abs().max()) for a, b in zip(bat_grads, seq_grads)) <= 1e-6


@pytest.mark.parametrize("subset", ["norms_biases", "output"])
def test_a_perturbed_subset_alone_is_stacked_and_the_step_is_unchanged(subset, monkeypatch):
    """trainer.perturb_params: the tensors outside the search are never moved by a sample, so the
    batched step stacks only the searched ones ((K+1) copies of the subset, not of the model) and
    its losses and update still equal sequential decoding's."""
    tokenizer = word_tokenizer()
    stacked = []
    real_stack = population.stack_parameters
    monkeypatch.setattr(population, "stack_parameters",
                        lambda params, size: stacked.append((sum(p.numel() for p in params), size)) or real_stack(params, size))
    results = {}
    for mode in ("sequential", "batched"):
        model = tiny_model()
        batch = make_batch(tokenizer, model)
        rule = mgs_rule(model, tokenizer, decode_population=mode, num_samples=4, perturb_params=subset,
                        noise_mode="constant", noise_scale=0.5)
        losses = []
        real = rule.metric.loss_from_stats
        rule.metric.loss_from_stats = lambda stats: losses.append(real(stats)) or losses[-1]
        rule.step(batch, step=3)
        results[mode] = (losses, [p.grad.clone() for p in model.parameters() if p.requires_grad])
        searched = sum(p.numel() for p, flag in zip(rule._params(model), rule.searched) if flag)
        total = sum(p.numel() for p in rule._params(model))
    assert stacked == [(searched, 5)] and searched < total / 3, (stacked, searched, total)
    (seq_losses, seq_grads), (bat_losses, bat_grads) = results["sequential"], results["batched"]
    assert len(set(bat_losses)) > 1, bat_losses  # the subset's noise changes some outputs
    np.testing.assert_allclose(bat_losses, seq_losses, rtol=0, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(bat_grads, seq_grads)) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("rows", [4, 16])
def test_batched_step_memory_is_the_stacks_plus_k_plus_1_decodes(rows):
    """What a batched MGS step allocates beyond a sequential one: the stacked parameters ((K+1)
    models) and the activations of (K+1)·B decoded rows instead of B. So its peak is within
    (K+1) models + the MLE step's peak + (K+1) times one decode's activations; the last term is not
    negligible (measured here at 4 rows: MLE 106 kB, model 88 kB, one decode 25 kB, batched step
    631 kB: 85 kB above (K+1) models + MLE peak). Peaks are torch's CPU allocations (profiler memory
    events), with the backup of θ and AdamW's state already allocated, as in training."""
    tokenizer = word_tokenizer()
    model = tiny_model()
    batch = make_batch(tokenizer, model, n=rows)
    k = 4
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peaks = {}
    for mode in ("sequential", "batched"):
        rule = mgs_rule(model, tokenizer, decode_population=mode, num_samples=k)
        rule.optimizer = optimizer

        def mgs_step():
            optimizer.zero_grad(set_to_none=True)
            rule.step(batch, 1)
            rule.apply(optimizer)

        mgs_step()
        peaks[mode] = allocated_peak(mgs_step)
    mle = build_rule("mle", cfg=OmegaConf.structured(MLEConfig()), model=model, tokenizer=tokenizer, metric=None,
                     accelerator=Accelerator(cpu=True))

    def mle_step():
        optimizer.zero_grad(set_to_none=True)
        mle.step(batch, 0)
        optimizer.step()

    mle_step()
    peaks["mle"] = allocated_peak(mle_step)
    peaks["decode"] = allocated_peak(lambda: generate(model, batch, max_new_tokens=8))
    assert peaks["batched"] - peaks["sequential"] >= k * model_bytes, (peaks, model_bytes)  # the stacks are there
    assert peaks["batched"] <= peaks["sequential"] + (k + 1) * model_bytes + k * peaks["decode"], (peaks, model_bytes)
    assert peaks["batched"] <= peaks["mle"] + (k + 1) * (model_bytes + peaks["decode"]), (peaks, model_bytes)

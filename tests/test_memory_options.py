"""Memory options under every rule: model.gradient_checkpointing=true and mixed_precision=bf16.

Pinned: checkpointing recomputes activations without changing the MLE gradient (dropout off: the
recomputation draws no other mask), for a full model and a LoRA-adapted one, through
mleps.models.prepare_model (the one place the loop sets a model up); and two steps of each rule
run with either option on tiny_marian and move the weights.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mleps.config import ModelConfig
from mleps.models import prepare_model
from mleps.trainers.base import token_cross_entropy
from test_mgs import make_batch, tiny_model, word_tokenizer
from test_peft import config, pairs, run  # noqa: F401  (pairs: the fixture)

RULES = ["mle", "pg", "mrt", "mgs"]
SAMPLING = ["trainer.num_samples=2", "trainer.max_new_tokens=8"]


def mle_gradient(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    loss, tokens = token_cross_entropy(model, batch)
    (loss / tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_gradient_checkpointing_leaves_the_mle_gradient_unchanged(peft):
    tokenizer = word_tokenizer()
    options = {"peft": peft, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj", "fc1"]}
    grads = {}
    for checkpointing in (False, True):
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig(name="tiny_marian")),
                                    {**options, "gradient_checkpointing": checkpointing})
        torch.manual_seed(1)  # the same base and adapter initialisation
        model = prepare_model(tiny_model(seed=0), model_cfg)
        if peft == "lora":  # a non-zero B, so every adapter tensor has a gradient
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        assert model.is_gradient_checkpointing == checkpointing
        grads[checkpointing] = mle_gradient(model, make_batch(tokenizer, model))
    plain, checkpointed = grads[False], grads[True]
    assert plain.keys() == checkpointed.keys() and len(plain) > 4
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def two_steps_move_the_weights(pairs, tmp_path, rule, *option):
    extra = [*option, "trainer.max_steps=2", *(SAMPLING if rule != "mle" else [])]
    cfg = config(pairs, tmp_path / "run", "seq2seq", rule, *extra)
    (tmp_path / "run").mkdir()
    from mleps.loop import Loop

    loop = Loop(cfg, tmp_path / "run")
    loop.setup()
    before = {n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
    loop.train()
    assert loop.state.step == 2 and loop.state.bad_steps_total == 0
    after = dict(loop.model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before), "no weight moved"
    return loop


@pytest.mark.parametrize("rule", RULES)
def test_two_steps_of_every_rule_with_gradient_checkpointing(pairs, tmp_path, rule):
    loop = two_steps_move_the_weights(pairs, tmp_path, rule, "model.gradient_checkpointing=true")
    assert loop.model.is_gradient_checkpointing


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's state is one per process: an earlier test's mixed_precision=no would stick."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("rule", RULES)
def test_two_steps_of_every_rule_in_bf16(pairs, tmp_path, rule, fresh_accelerator_state):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        Accelerator(cpu=True, mixed_precision="bf16")
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"accelerate refuses bf16 on this CPU: {e}")
    AcceleratorState._reset_state()  # the loop builds its own
    loop = two_steps_move_the_weights(pairs, tmp_path, rule, "mixed_precision=bf16")
    assert loop.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in loop.model.parameters()), "bf16 autocast keeps the weights fp32"

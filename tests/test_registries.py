"""The extension points: a rule, a task loss, a model source and a model family each register in one
place, and the loop, the config and validation find them there (no name lists elsewhere)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose_cfg
from mleps import families, models
from mleps.config import MetricConfig
from mleps.errors import UserError
from mleps.task_loss import TASK_LOSSES, TaskLoss, register_task_loss
from mleps.trainers import RULES, rule_class
from mleps.trainers.mle import MLE, MLEConfig
from mleps.trainers.base import register_rule


def test_a_rule_registers_with_its_schema_and_declares_its_needs():
    @dataclass
    class HalfMLEConfig(MLEConfig):
        name: str = "test_half_mle"
        scale: float = 0.5  # the only new knob

    @register_rule
    class HalfMLE(MLE):
        name, schema = "test_half_mle", HalfMLEConfig
        needs_sentence_loss = True

    try:
        assert rule_class("test_half_mle") is HalfMLE
        cfg = compose_cfg("trainer=mle", "trainer.name=test_half_mle", "data_dir=/d")
        assert cfg.trainer.name == "test_half_mle"
        assert all(cls.name == name and cls.schema.__dataclass_fields__["name"].default == name
                   for name, cls in RULES.items()), "each rule's schema names its rule"
        assert [name for name, cls in RULES.items() if cls.needs_sentence_loss] == ["pg", "mrt", "test_half_mle"]
        assert [name for name, cls in RULES.items() if cls.needs_optimizer] == ["mgs"]
    finally:
        RULES.pop("test_half_mle")
    with pytest.raises(TypeError):
        register_rule(type("Nameless", (MLE,), {"name": ""}))


def test_a_loss_with_an_option_brings_its_metric_key():
    assert {"n", "unit", "score_model", "reduction", "fn", "losses", "weights", "rouge_key",
            "rouge_tokenizer"} <= set(MetricConfig.__dataclass_fields__)
    assert OmegaConf.structured(MetricConfig).n == 4

    @dataclass
    class ClashingOptions:
        n: str = "four"  # another type for an option repetition already declares

    with pytest.raises(TypeError, match="metric.n"):
        register_task_loss(type("Clash", (TaskLoss,), {"name": "test_clash", "options": ClashingOptions}))
    assert "test_clash" not in TASK_LOSSES


def test_a_model_source_is_checked_at_start_by_its_own_check():
    assert models.model_source("tiny_gpt2").family == "causal" and models.model_source("hf").family is None
    cfg = compose_cfg("data_dir=/d", "model.heads=3")
    with pytest.raises(UserError, match="model.heads=3"):
        models.model_source(cfg.model.name).check(cfg)
    with pytest.raises(UserError, match="unknown model"):
        models.model_source("no_such_model")


def test_a_family_registered_later_is_tried_first():
    class Toy(torch.nn.Module):
        config = type("C", (), {"is_encoder_decoder": False})()

    assert families.family_for(Toy()).name == "causal"

    @families.register_family
    class ToyFamily(families.CausalFamily):
        name = "toy"

        def handles(self, model) -> bool:
            return isinstance(model, Toy)

    try:
        assert families.family_for(Toy()).name == "toy"
    finally:
        families.FAMILIES.pop(0)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_layering_the_library_never_imports_the_lab_nor_losses_a_rule():
    for path in (REPO / "mleps").rglob("*.py"):
        assert not any(m.startswith("mleps_lab") for m in imports_of(path)), f"{path} imports the lab"
    for path in [*(REPO / "mleps" / "losses").glob("*.py"), REPO / "mleps" / "metrics.py", REPO / "mleps" / "task_loss.py"]:
        assert not any(m.startswith(("mleps.trainers", "mleps.loop", "mleps.config")) for m in imports_of(path)), path
    for path in (REPO / "mleps" / "trainers").glob("*.py"):
        assert not any(m in ("mleps.config", "mleps.loop") for m in imports_of(path)), path
    assert "mleps.loop" not in imports_of(REPO / "mleps" / "evaluate.py")

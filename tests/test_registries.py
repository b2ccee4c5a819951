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
from mleps.config import metric_schema
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


def test_each_loss_has_its_own_metric_node():
    repetition = set(metric_schema("repetition").__dataclass_fields__)
    assert repetition == {"name", "level", "n"} and OmegaConf.structured(metric_schema("repetition")).n == 4
    assert set(metric_schema("length").__dataclass_fields__) == {"name", "level", "unit", "target"}
    # composite's components read their options from its node: every loss's options are there
    assert {"n", "unit", "score_model", "reduction", "fn", "losses", "weights", "rouge_key", "rouge_tokenizer",
            "target", "word"} <= set(metric_schema("composite").__dataclass_fields__)
    with pytest.raises(Exception, match="metric.unit"):  # an option of another loss is no key of this one
        compose_cfg("data_dir=/d", "metric=repetition", "metric.unit=char")

    @dataclass
    class ClashingOptions:
        n: str = "four"  # another type for an option repetition already declares

    with pytest.raises(TypeError, match="metric.n"):
        register_task_loss(type("Clash", (TaskLoss,), {"name": "test_clash", "options": ClashingOptions}))
    assert "test_clash" not in TASK_LOSSES


@dataclass
class WidthOptions:
    width: int = 3  # test_width: a key no built-in loss has


class WidthLoss(TaskLoss):
    """A loss a user's package registers after mleps is imported: the share of outputs wider than `width`."""

    name, options = "test_width", WidthOptions

    def __init__(self, level="corpus", width=3):
        super().__init__(level)
        self.width = width

    def sentence_losses(self, decoded):
        return [float(len(t.split()) > self.width) for t in decoded.texts]


def test_a_loss_registered_after_import_brings_its_own_node():
    from hydra.core.config_store import ConfigStore

    register_task_loss(WidthLoss)
    try:
        cfg = compose_cfg("data_dir=/d", "metric=test_width", "metric.width=7", "metric.level=sentence")
        assert OmegaConf.get_type(cfg.metric) is metric_schema("test_width")
        assert (cfg.metric.name, cfg.metric.level, cfg.metric.width) == ("test_width", "sentence", 7)
        from mleps.metrics_config import metric_from_config

        loss = metric_from_config(cfg.metric)
        assert isinstance(loss, WidthLoss) and (loss.width, loss.level) == (7, "sentence")
        assert "width" in metric_schema("composite").__dataclass_fields__  # composite's components may use it
        register_task_loss(WidthLoss)  # the same class again (a module imported twice) is no clash
    finally:
        TASK_LOSSES.pop("test_width")
        for key in ("test_width.yaml", "test_width_metric_schema.yaml"):
            ConfigStore.instance().repo["metric"].pop(key, None)


def test_a_loss_registered_twice_under_one_name_is_one_error_line():
    other = type("OtherRepetition", (TaskLoss,), {"name": "repetition"})
    with pytest.raises(UserError, match=r"^task loss 'repetition' is registered twice \(mleps.losses.repetition.Repetition "
                                        r"and .*OtherRepetition\): give one of them another name$") as e:
        register_task_loss(other)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert TASK_LOSSES["repetition"].__name__ == "Repetition"


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


def test_a_run_saved_with_every_loss_s_options_in_one_metric_node_still_resumes(base_cfg, tmp_path):
    """Before each task loss had its own config node, config.yaml held every loss's metric.* keys."""
    from omegaconf import OmegaConf

    from mleps.errors import UserError
    from mleps.rundir import _check_same_config

    saved = OmegaConf.to_container(base_cfg, resolve=True)
    saved["metric"].update({"n": 4, "reduction": "mean", "rouge_key": "rougeL", "unit": "word", "losses": []})
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    _check_same_config(base_cfg, tmp_path)  # the other losses' keys are not a change
    saved["metric"]["name"] = "chrf"  # the run's own task loss is
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    with pytest.raises(UserError, match="metric.name"):
        _check_same_config(base_cfg, tmp_path)

"""Config typing: the YAML groups compose against the dataclass schemas; bad overrides fail at start."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional  # test_check_finite_passes_a_null_list_knob's schema

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import mleps.config as schemas
from mleps.trainers import RULES
from conftest import CONF_DIR, TINY_CLI, assert_user_error, compose_cfg, run_cli, run_main, write_jsonl


TRAINER_YAMLS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
PRESETS = {"mgs_paper": "mgs", "mgs_steer": "mgs", "grpo": "pg"}  # a yaml that presets a rule's options, and the rule it runs


@pytest.mark.parametrize("option", TRAINER_YAMLS)
def test_every_trainer_yaml_composes_against_its_schema(option):
    cfg = compose_cfg(f"trainer={option}", "data_dir=/somewhere")
    name = PRESETS.get(option, option)
    assert OmegaConf.get_type(cfg.trainer) is RULES[name].schema
    assert cfg.trainer.name == name
    assert isinstance(cfg.trainer.lr, float) and isinstance(cfg.trainer.max_steps, int)
    assert set(TRAINER_YAMLS) == set(RULES) | set(PRESETS)
    assert issubclass(RULES[name], __import__("mleps.trainers.base").trainers.base.UpdateRule)


@pytest.mark.parametrize("group,schema", [("data", schemas.DataConfig), ("model", schemas.ModelConfig),
                                          ("metric", schemas.metric_schema)])
def test_every_option_of_the_other_groups_composes_against_its_schema(group, schema):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_cfg(f"{group}={option}", "data_dir=/somewhere")
        expected = schema(option) if group == "metric" else schema  # each task loss has its own node
        assert OmegaConf.get_type(cfg[group]) is expected, option
        assert cfg[group].name == option, option


def test_the_defaults_are_the_documented_main_job():
    cfg = compose_cfg("data_dir=/d")
    assert (cfg.data.name, cfg.model.name, cfg.trainer.name, cfg.metric.name) == (
        "multi30k_de_en", "tiny_marian", "mgs", "bleu")
    assert cfg.data.train_file == "/d/multi30k/train.jsonl"
    ev = compose_cfg("data_dir=/d", config_name="evaluate")
    assert OmegaConf.is_missing(ev, "checkpoint") and ev.split == "test"


def test_typed_fields_reject_wrong_values_in_python_too(base_cfg):
    with pytest.raises(ValidationError):
        base_cfg.trainer.lr = "abc"
    with pytest.raises(ValidationError):
        base_cfg.data.max_train_examples = "many"
    base_cfg.trainer.lr = "2e-3"  # a numeric string converts
    assert base_cfg.trainer.lr == 0.002


@pytest.mark.parametrize("output_dir,resume,expected", [
    ("/runs/a", False, "/runs/a"), (None, "/runs/b", "/runs/b"), ("/runs/a", "/runs/b", "/runs/a"),
    (None, True, "outputs/"), (None, False, "outputs/")])
def test_the_run_dir_is_output_dir_then_a_resumed_run_then_hydras(output_dir, resume, expected, tmp_path,
                                                                  monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.chdir(tmp_path)  # "/runs/b" is made relative to a folder that holds a run there
    if isinstance(resume, str):
        resume, expected = resume.lstrip("/"), expected.replace("/runs/b", "runs/b")
        (tmp_path / resume).mkdir(parents=True)
        (tmp_path / resume / "metrics.jsonl").write_text("")
    overrides = [f"output_dir={output_dir if output_dir else 'null'}", f"resume={resume}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        run_dir = cfg.hydra.run.dir
    if expected.endswith("/"):  # Hydra's dated default, outputs/DATE/TIME
        assert run_dir.startswith(expected) and len(run_dir) > len(expected), run_dir
    else:
        assert run_dir == expected


# --------------------------------------------------------------------------- the CLI refuses at start


@pytest.mark.parametrize("override,key", [("trainer.lr=abc", "trainer.lr"), ("trainer.max_steps=1.5", "trainer.max_steps"),
                                          ("progress=maybe", "progress"), ("trainer.lrr=0.1", "trainer.lrr"),
                                          ("+trainer.lrr=0.1", "lrr"), ("nogroup=x", "nogroup")])
def test_hydra_errors_are_one_line_and_exit_2_before_anything_runs(tmp_path, capfd, override, key):
    """Wrong types and unknown keys or groups: Hydra's own multi-line report becomes one line."""
    out = tmp_path / "run"
    code, _, err = run_main("mleps.train", "trainer=mle", override, f"output_dir={out}", capfd=capfd)
    assert_user_error(code, err, key)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # nothing ran


def test_an_unknown_trainer_fails_listing_the_options_without_internal_schemas(tmp_path, capfd):
    out = tmp_path / "run"
    code, _, err = run_main("mleps.train", "trainer=nope", f"output_dir={out}", capfd=capfd)
    line = assert_user_error(code, err, "trainer/nope")
    for name in RULES:
        assert name in line
    assert "_schema" not in line
    assert not out.exists()


@pytest.mark.slow
def test_the_cli_subprocess_gives_one_line_for_a_hydra_error(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("mleps.train", "trainer=mle", "trainer.lr=abc", f"output_dir={out}", cwd=tmp_path)
    assert_user_error(rc, err, "trainer.lr")
    rc, _, err = run_cli("mleps.evaluate", "checkpoint=x", "decode.num_beams=many", cwd=tmp_path)
    assert_user_error(rc, err, "decode.num_beams")


@pytest.mark.parametrize("override,needle", [("trainer.schedule=wavy", "trainer.schedule"),
                                             ("metric.level=paragraph", "paragraph"),
                                             ("metric=bleu", None)])
def test_bad_choices_in_typed_strings_are_user_errors(tmp_path, capfd, multi30k_rows, override, needle):
    """Values the type system cannot check (a schedule name, a metric level) still fail cleanly."""
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:40]])
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, "trainer.max_steps=1", "trainer.batch_size=4",
                            "data=local", f"data.train_file={f}", f"output_dir={tmp_path / 'run'}", override,
                            capfd=capfd)
    if needle is None:  # the control: the same command with a valid value runs
        assert code == 0, err
        assert Path(tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()
    else:
        assert_user_error(code, err, needle)


def test_check_finite_passes_a_null_list_knob():
    """An Optional[List] knob left at null (the lab's trainer.oracle_rows) holds no number to check: every
    trainer=mgs run of mleps_lab.train failed at start with a TypeError when check_finite iterated it."""
    from dataclasses import dataclass, field

    from mleps.errors import UserError
    from mleps.validate import check_finite

    @dataclass
    class Knobs:
        rows: Optional[List[float]] = None
        scales: List[float] = field(default_factory=lambda: [1.0, 2.0])

    check_finite(OmegaConf.structured(Knobs))
    with pytest.raises(UserError, match="scales"):
        check_finite(OmegaConf.structured(Knobs(scales=[1.0, float("inf")])))

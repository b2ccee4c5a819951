"""Config typing: the YAML groups compose against the dataclass schemas; bad overrides fail at start."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import mleps.config as schemas
from conftest import CONF_DIR, TINY_CLI, assert_user_error, compose_cfg, run_cli, run_main, write_jsonl


@pytest.mark.parametrize("name", sorted(schemas.TRAINER_SCHEMAS))
def test_every_trainer_yaml_composes_against_its_schema(name):
    cfg = compose_cfg(f"trainer={name}", "data_dir=/somewhere")
    assert OmegaConf.get_type(cfg.trainer) is schemas.TRAINER_SCHEMAS[name]
    assert cfg.trainer.name == name
    assert isinstance(cfg.trainer.lr, float) and isinstance(cfg.trainer.max_steps, int)
    assert {p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")} == set(schemas.TRAINER_SCHEMAS)


@pytest.mark.parametrize("group,schema", [("data", schemas.DataConfig), ("model", schemas.ModelConfig),
                                          ("metric", schemas.MetricConfig)])
def test_every_option_of_the_other_groups_composes_against_its_schema(group, schema):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_cfg(f"{group}={option}", "data_dir=/somewhere")
        assert OmegaConf.get_type(cfg[group]) is schema, option
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
def test_the_run_dir_is_output_dir_then_a_resumed_run_then_hydras(output_dir, resume, expected):
    from hydra import compose, initialize_config_dir

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
                                          ("progress=maybe", "progress")])
def test_a_wrongly_typed_override_fails_at_start_naming_the_key(tmp_path, override, key):
    out = tmp_path / "run"
    rc, stdout, err = run_cli("mleps.train", "trainer=mle", override, f"output_dir={out}", cwd=tmp_path)
    assert rc != 0
    assert key in err, err
    assert not out.exists()  # nothing ran


def test_an_unknown_key_fails(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("mleps.train", "trainer=mle", "trainer.lrr=0.1", f"output_dir={out}", cwd=tmp_path)
    assert rc != 0
    assert "trainer.lrr" in err, err
    assert not out.exists()


def test_an_unknown_trainer_fails_listing_the_options(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("mleps.train", "trainer=nope", f"output_dir={out}", cwd=tmp_path)
    assert rc != 0
    assert "trainer/nope" in err, err
    for name in schemas.TRAINER_SCHEMAS:
        assert name in err
    assert not out.exists()


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

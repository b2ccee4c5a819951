"""Every bad number or option of a training command: one `error:` line naming the key, exit 2, at start,
nothing written into the run dir. One row per value: inf and nan pass range checks of the form
`not x >= 0`, so each float knob is tried with them too."""
from __future__ import annotations

import pytest

from conftest import TINY_CLI, assert_user_error, run_main, write_jsonl

# (trainer, override, what the error line must name)
TABLE = [
    # finiteness: every float knob
    ("pg", "trainer.kl_coef=inf", "trainer.kl_coef=inf"),
    ("pg", "trainer.kl_coef=nan", "trainer.kl_coef=nan"),
    ("mrt", "trainer.sharpness=inf", "trainer.sharpness=inf"),
    ("pg", "trainer.mle_mix=inf", "trainer.mle_mix=inf"),
    ("mrt", "trainer.mle_mix=inf", "trainer.mle_mix=inf"),
    ("pg", "trainer.sample_temperature=nan", "trainer.sample_temperature=nan"),
    ("pg", "trainer.sample_temperature=inf", "trainer.sample_temperature=inf"),
    ("mle", "trainer.lr=inf", "trainer.lr=inf"),
    ("mle", "trainer.weight_decay=inf", "trainer.weight_decay=inf"),
    ("mle", "trainer.max_grad_norm=nan", "trainer.max_grad_norm=nan"),
    ("mle", "trainer.label_smoothing=nan", "trainer.label_smoothing=nan"),
    ("mle", "decode.length_penalty=nan", "decode.length_penalty=nan"),
    ("mle", "trainer.max_train_s=inf", "trainer.max_train_s=inf"),
    ("mle", "trainer.max_length_ratio=inf", "trainer.max_length_ratio=inf"),
    ("mgs", "trainer.guide_scale=inf", "trainer.guide_scale=inf"),
    ("mgs", "trainer.warm_start_lr=inf", "trainer.warm_start_lr=inf"),
    ("mle", "collective_timeout_s=inf", "collective_timeout_s=inf"),
    # ranges
    ("mle", "decode.num_beams=-1", "decode.num_beams=-1"),
    ("mle", "trainer.batch_tokens=-5", "trainer.batch_tokens=-5"),
    ("mle", "trainer.max_length_ratio=-1", "trainer.max_length_ratio=-1"),
    ("mle", "data.prefix_tokens=-1", "data.prefix_tokens=-1"),
    ("mle", "data.continuation_tokens=-1", "data.continuation_tokens=-1"),
    ("mle", "trainer.patience=-1", "trainer.patience=-1"),
    ("mle", "seed=-1", "seed=-1"),
    ("mgs", "trainer.warm_start_lr=-0.1", "trainer.warm_start_lr=-0.1"),
    ("mle", "trainer.max_train_s=-1", "trainer.max_train_s=-1"),
    ("mgs", "trainer.guide_scale=-1", "trainer.guide_scale=-1"),
    ("pg", "trainer.kl_coef=-1", "trainer.kl_coef=-1"),
    ("mrt", "trainer.sharpness=0", "trainer.sharpness=0"),
    # choices
    ("mle", "metric.level=foo", "metric.level"),
    ("mle", "trainer.schedule=foo", "trainer.schedule"),
    ("pg", "trainer.scale_rewards=foo", "trainer.scale_rewards"),
    ("mle", "model.peft=foo", "model.peft"),
    ("mle", "data.sequences=foo", "data.sequences"),
    ("mle", "mixed_precision=foo", "mixed_precision"),
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, multi30k_rows):
    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:8]]
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "dev.jsonl", rows[:4])


@pytest.mark.parametrize("trainer,override,needle", TABLE, ids=[row[1] for row in TABLE])
def test_a_bad_value_is_one_line_at_start_and_writes_nothing(tmp_path, capfd, pairs, trainer, override, needle):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", f"trainer={trainer}", *TINY_CLI, "data=local",
                            f"data.train_file={pairs[0]}", f"data.validation_file={pairs[1]}", f"output_dir={run}",
                            override, capfd=capfd)
    assert_user_error(code, err, needle)
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())

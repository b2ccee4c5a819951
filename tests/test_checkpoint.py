"""Checkpoints: atomic saves, failures that keep the previous checkpoint, exact RNG state, safe loading.

Unit tests on a 1-layer MarianMTModel and a word-level tokenizer (no data, no downloads). The
kill-during-save case with a real process is in test_resume.py (MLEPS_TEST_SAVE_DELAY_S).
"""
from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mleps.checkpoint as ckpt
from mleps.checkpoint import STATE_FILE, find_complete, load_training_state, save_checkpoint
from mleps.config import ModelConfig
from mleps.errors import UserError
from mleps.models import load_checkpoint, tiny_marian


def tiny(seed: int = 0):
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(seed)
    model = tiny_marian(SimpleNamespace(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.1), tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(input_ids=torch.tensor([[3, 4, 2]]), decoder_input_ids=torch.tensor([[0, 5]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    return model, tokenizer, optimizer, scheduler


def save(folder, model, tokenizer, optimizer=None, scheduler=None, step=1):
    return save_checkpoint(folder, model, tokenizer, {"source_prefix": ""}, state={"step": step},
                           optimizer=optimizer, scheduler=scheduler)


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_checkpoint_is_safetensors_only_and_reloads_with_tied_embeddings(tmp_path):
    model, tokenizer, optimizer, scheduler = tiny()
    folder = save(tmp_path / "last", model, tokenizer, optimizer, scheduler)
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", STATE_FILE, "optimizer.pt", "scheduler.pt", "rng.pt"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not list(tmp_path.glob(".last.*")), "no temporary or aside folder is left"

    loaded, _, _ = load_checkpoint(str(folder))
    shared = loaded.get_input_embeddings().weight
    assert loaded.get_output_embeddings().weight.data_ptr() == shared.data_ptr()
    assert loaded.model.encoder.embed_tokens.weight.data_ptr() == shared.data_ptr()
    assert loaded.model.decoder.embed_tokens.weight.data_ptr() == shared.data_ptr()
    original = dict(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_optimizer_and_scheduler_state_round_trip(tmp_path):
    model, tokenizer, optimizer, scheduler = tiny()
    folder = save(tmp_path / "last", model, tokenizer, optimizer, scheduler, step=7)
    _, _, optimizer2, scheduler2 = tiny(seed=1)
    assert load_training_state(folder, optimizer2, scheduler2) == {"step": 7}
    a, b = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert scheduler2.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]


def test_rng_state_round_trip_is_exact(tmp_path):
    model, tokenizer, _, _ = tiny()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both generators
    folder = save(tmp_path / "last", model, tokenizer)
    expected = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_training_state(folder)
    got = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_missing_or_unreadable_rng_state_is_an_error(tmp_path, damage):
    model, tokenizer, _, _ = tiny()
    folder = save(tmp_path / "last", model, tokenizer)
    if damage == "missing":
        (folder / "rng.pt").unlink()
    else:
        (folder / "rng.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"cannot resume: .*rng\.pt is missing or unreadable"):
        load_training_state(folder)


def test_disk_full_during_save_keeps_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    model, tokenizer, optimizer, scheduler = tiny()
    folder = save(tmp_path / "last", model, tokenizer, optimizer, scheduler, step=1)
    before = weights(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(UserError) as err:
        save(folder, model, tokenizer, optimizer, scheduler, step=2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not write checkpoint {folder}: No space left on device")
    assert find_complete(folder) == folder
    assert_same(weights(folder), before)
    assert load_training_state(folder) == {"step": 1}
    assert not list(tmp_path.glob(".last.*")), "the half-written folder is removed"


def fail_second_rename(monkeypatch, error: BaseException):
    """The first os.replace moves the old folder aside; make the second (new folder in) raise."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise error
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    return real_replace


def test_failure_while_moving_the_new_folder_in_puts_the_old_one_back(tmp_path, monkeypatch):
    model, tokenizer, _, _ = tiny()
    folder = save(tmp_path / "last", model, tokenizer, step=1)
    before = weights(folder)
    real_replace = fail_second_rename(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(UserError, match="could not write checkpoint"):
        save(folder, model, tokenizer, step=2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert find_complete(folder) == folder
    assert_same(weights(folder), before)


def test_kill_between_the_two_renames_leaves_the_previous_checkpoint_findable(tmp_path, monkeypatch):
    """A SIGKILL cannot be caught; KeyboardInterrupt at the same point skips every recovery step the same way."""
    model, tokenizer, _, _ = tiny()
    folder = save(tmp_path / "last", model, tokenizer, step=1)
    before = weights(folder)
    real_replace = fail_second_rename(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save(folder, model, tokenizer, step=2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not folder.exists() and (tmp_path / ".last.old" / STATE_FILE).is_file()
    assert find_complete(folder) == folder, "moved back under its own name"
    assert_same(weights(folder), before)
    load_checkpoint(str(folder))
    save(folder, model, tokenizer, step=3)  # and the next save works as usual
    assert load_training_state(folder) == {"step": 3}


class _Boom:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path):
    model, tokenizer, _, _ = tiny()
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(marker), f, protocol=2)
    with pytest.raises(UserError, match=r"holds no model files \(config.json \+ \*\.safetensors\)"):
        load_checkpoint(str(folder))
    assert not marker.exists()


def test_pickled_trainer_state_is_refused_and_never_unpickled(tmp_path):
    model, tokenizer, optimizer, scheduler = tiny()
    folder = save(tmp_path / "last", model, tokenizer, optimizer, scheduler)
    marker = tmp_path / "unpickled"
    with open(folder / "optimizer.pt", "wb") as f:
        pickle.dump(_Boom(marker), f, protocol=2)
    with pytest.raises(UserError, match=r"optimizer\.pt is missing or unreadable"):
        load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()


def test_remote_code_is_off_unless_configured(tmp_path):
    """A checkpoint whose config.json points at its own Python code (auto_map) is refused through
    the real load path, and the code never runs, unless model.trust_remote_code=true."""
    import json

    assert ModelConfig.trust_remote_code is False
    model, tokenizer, _, _ = tiny()
    folder = save(tmp_path / "remote", model, tokenizer)
    marker = tmp_path / "remote_code_ran"
    (folder / "custom_marian.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import MarianConfig, MarianMTModel\n"
        "class CustomConfig(MarianConfig):\n    model_type = 'custom_marian'\n"
        "class CustomModel(MarianMTModel):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_marian", auto_map={"AutoConfig": "custom_marian.CustomConfig",
                                                        "AutoModelForSeq2SeqLM": "custom_marian.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_checkpoint(str(folder))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert not marker.exists(), "the checkpoint's own code ran without trust_remote_code"
    loaded, _, _ = load_checkpoint(str(folder), trust_remote_code=True)
    assert marker.exists() and type(loaded).__name__ == "CustomModel"

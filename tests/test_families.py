"""The model-family seam: a family owns its kind name, its Auto class, how it generates and collates, and the
data options it refuses; models, validation and the API ask it. A family registered here, from a test module,
is found by `model.kind=<its name>`, loads through its Auto class and checks its own options."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import WORDS, word_tokenizer
from mleps import families
from mleps.errors import UserError
from mleps.families import CausalFamily, family_for, family_named, register_family


class PromptOnlyFamily(CausalFamily):
    """A decoder-only variant for models marked `mleps_test_prompt_only`: trains on completion data whose
    loss covers the continuation only (its own option check)."""

    name = "test_prompt_only"

    def handles_config(self, config) -> bool:
        return bool(getattr(config, "mleps_test_prompt_only", False))

    def check_options(self, data) -> None:
        super().check_options(data)
        if data.loss_on != "continuation":
            raise UserError(f"data.loss_on={data.loss_on}: model.kind={self.name} scores the continuation only: "
                            f"set data.loss_on=continuation")


@pytest.fixture
def prompt_only_family():
    register_family(PromptOnlyFamily)
    yield family_named(PromptOnlyFamily.name)
    families.FAMILIES[:] = [f for f in families.FAMILIES if f.name != PromptOnlyFamily.name]


def tiny_gpt2_model(marked: bool):
    from mleps.models import tiny_gpt2

    cfg = OmegaConf.create({"d_model": 16, "layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0,
                            "max_positions": 64})
    model = tiny_gpt2(cfg, word_tokenizer(append_eos=False))
    model.config.mleps_test_prompt_only = marked
    return model


def test_a_family_registered_from_a_test_module_is_asked_by_models_validate_and_api(prompt_only_family, tmp_path):
    from mleps.api import Trainer
    from mleps.models import from_pretrained, model_kind
    from mleps.validate import check_family_options

    model = tiny_gpt2_model(marked=True)
    assert family_for(model) is prompt_only_family and family_for(tiny_gpt2_model(marked=False)).name == "causal"
    # models: model.kind=<name> is a known kind, and a saved checkpoint of that family loads through its Auto class
    tokenizer = word_tokenizer(append_eos=False)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    assert model_kind(str(tmp_path / "ckpt")) == prompt_only_family.name  # the checkpoint's config says so
    loaded, _ = from_pretrained(str(tmp_path / "ckpt"), kind=prompt_only_family.name)
    assert type(loaded).__name__ == "GPT2LMHeadModel" and family_for(loaded) is prompt_only_family
    # validate: the family's own option check
    data = OmegaConf.create({"task": "completion", "loss_on": None})
    with pytest.raises(UserError, match="data.loss_on=continuation"):
        check_family_options(data, prompt_only_family.name)
    check_family_options(OmegaConf.create({"task": "completion", "loss_on": "continuation"}), prompt_only_family.name)
    # api: a model object's kind is its family's name (what validation checks options against)
    trainer = Trainer(model, tokenizer, config=["data=completion"], output_dir=tmp_path / "run")
    assert trainer.config.model.kind == prompt_only_family.name


def test_the_built_in_families_own_their_auto_class_rows_and_collator():
    from mleps.models import tiny_marian

    seq2seq, causal = family_named("seq2seq"), family_named("causal")
    assert (seq2seq.auto_class, causal.auto_class) == ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM")
    marian = tiny_marian(OmegaConf.create({"d_model": 16, "layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0}),
                         word_tokenizer())
    for family, model, tokenizer in ((seq2seq, marian, word_tokenizer()),
                                     (causal, tiny_gpt2_model(False), word_tokenizer(append_eos=False))):
        assert family_for(model) is family
        rows = {"input_ids": [tokenizer(" ".join(WORDS[:3]))["input_ids"], tokenizer(WORDS[4])["input_ids"]],
                "labels": [[5, 6, 2], [7, 2]]}
        batch = family.collator(tokenizer, model)(rows)
        assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]
        out = family.generate(model.eval(), family.encode_sources(tokenizer, ["a b", "c"], 8), max_new_tokens=3,
                              do_sample=False)
        assert out[:, 0].tolist() == [family.start_id(model)] * 2  # the output rows' start column
    with pytest.raises(UserError, match="data.task=completion needs a decoder-only model"):
        seq2seq.check_options(OmegaConf.create({"task": "completion", "loss_on": None}))
    with pytest.raises(UserError, match="source -> target pairs need an encoder-decoder"):
        causal.check_options(OmegaConf.create({"task": "pairs", "loss_on": None}))


def test_a_family_registered_twice_under_one_name_is_one_line(prompt_only_family):
    class Again(CausalFamily):
        name = PromptOnlyFamily.name

    with pytest.raises(UserError, match="test_prompt_only.*registered already"):
        register_family(Again)
    with pytest.raises(UserError, match="model.kind=nope is not one of: auto, seq2seq, causal, test_prompt_only"):
        family_named("nope")

"""What mleps does to a model before and after FSDP shards it (mleps.distributed), in one process.

tests/test_fsdp_cpu.py runs the sharded training itself; these pin the two model-level steps on
transformers' own encoder-decoders, whose tied embedding FSDP2 could not shard as they come.
"""
from __future__ import annotations

import torch
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

from mleps import distributed

SMALL = dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=0,
             decoder_start_token_id=0, max_position_embeddings=32)


def models():
    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(**SMALL)).eval()
    bart = BartForConditionalGeneration(BartConfig(**SMALL, scale_embedding=True)).eval()
    return [marian, bart]


def holders(model):
    weight = model.get_input_embeddings().weight
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if getattr(module, "weight", None) is weight}


def test_the_tied_embedding_is_held_by_one_module_and_the_model_computes_the_same():
    ids = torch.tensor([[5, 7, 9, 2], [11, 3, 2, 0]])
    for model in models():
        before = model(input_ids=ids, decoder_input_ids=ids).logits
        keys = list(model.state_dict())
        embeddings = {n: m for n, m in holders(model).items() if isinstance(m, torch.nn.Embedding)}
        assert len({id(m) for m in embeddings.values()}) == 3, "the case this guards: three embedding modules"
        distributed.share_tied_embeddings(model)
        shared = {id(m) for n, m in holders(model).items() if isinstance(m, torch.nn.Embedding)}
        assert len(shared) == 1, type(model).__name__
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, before)
        assert list(model.state_dict()) == keys


def test_an_embedding_that_differs_in_more_than_its_name_is_left_alone():
    marian, _ = models()
    decoder_embed = marian.get_decoder().embed_tokens
    decoder_embed.padding_idx = 3  # same weight, other behaviour: not the same module
    distributed.share_tied_embeddings(marian)
    assert marian.get_decoder().embed_tokens is decoder_embed
    assert marian.get_encoder().embed_tokens is marian.get_input_embeddings()


def test_a_gathered_state_dict_saves_the_tensors_a_one_process_save_writes(tmp_path):
    from safetensors.torch import load_file

    def written(model, name, state_dict=None):
        # a copy: save_pretrained empties the dict it is given as it writes
        model.save_pretrained(tmp_path / name, safe_serialization=True,
                              state_dict=None if state_dict is None else dict(state_dict))
        return load_file(str(tmp_path / name / "model.safetensors"))

    for model in models():
        kind = type(model).__name__
        gathered = {k: v.clone() for k, v in model.state_dict().items()}  # FSDP: every holder, separate copies
        plain = written(model, f"{kind}-plain")
        assert sorted(written(model, f"{kind}-gathered", gathered)) != sorted(plain), "the copies this removes"
        ours = written(model, f"{kind}-kept", distributed.without_tied_copies(model, gathered))
        assert sorted(ours) == sorted(plain) and all(torch.equal(ours[k], plain[k]) for k in plain)

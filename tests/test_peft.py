"""LoRA adapters (model.peft=lora, mleps.adapters) under every rule's loop.

Pinned: only the adapter trains (the base's tensors stay bit-identical, the trainable count is
peft's, the optimizer holds only the adapter); a checkpoint holds the base and adapter/ and loads
back to the same predictions; resume is exact; init_from a LoRA checkpoint continues its adapter
(or merges it with model.peft=none); MGS's batched population decoding equals its sequential
decoding on an adapted model; bad LoRA options stop at start with exit 2 and no run dir.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CLI, TINY_MODEL, assert_user_error, compose_cfg, run_cli, run_main, write_jsonl
from mleps import adapters
from mleps.evaluation import decode_and_score
from mleps.loop import Loop
from mleps.metrics_config import metric_from_config
from mleps.models import load_checkpoint

LORA = ["model.peft=lora", "model.lora_r=4", "model.lora_alpha=8"]
MGS = ["trainer.num_samples=2", "trainer.max_new_tokens=8", "trainer.warm_start_steps=0"]
SMALL = ["data.max_train_examples=64", "data.max_eval_examples=8", "data.max_source_length=32",
         "data.max_target_length=32", "trainer.batch_size=8", "trainer.eval_every=1000", "trainer.log_every=1",
         "trainer.save_every=1000", "trainer.warmup_steps=0", "trainer.schedule=constant", "decode.max_new_tokens=8",
         "progress=false", "cpu=true"]
FAMILIES = {"seq2seq": ["model=tiny_marian", *TINY_MODEL],
            "causal": ["data=completion", "model=tiny_gpt2", *TINY_MODEL, "data.text_column=en",
                       "data.prefix_tokens=4", "data.continuation_tokens=8", "data.max_source_length=8"]}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, multi30k_rows):
    """64 + 8 Multi30k pairs as local files (a run reads and normalises its whole training file)."""
    folder = tmp_path_factory.mktemp("pairs")
    write_jsonl(folder / "train.jsonl", multi30k_rows[:64])
    write_jsonl(folder / "validation.jsonl", multi30k_rows[64:72])
    return folder


def local(pairs, family: str = "seq2seq") -> list[str]:
    """The pair files as the run's data: de -> en pairs, or (causal) documents of the English side."""
    files = [f"data.train_file={pairs}/train.jsonl", f"data.validation_file={pairs}/validation.jsonl"]
    return ["data=local", *files, "data.source_column=de", "data.target_column=en"] if family == "seq2seq" else files


def config(pairs, run_dir, family: str, rule: str, *extra: str):
    """A tiny run of `rule` on the family's embedded model (the causal one continues the pairs' English)."""
    data = local(pairs, family)
    return compose_cfg(f"trainer={rule}", *data, *FAMILIES[family], *SMALL, *(MGS if rule == "mgs" else []),
                       "trainer.max_steps=3", f"output_dir={run_dir}", *extra)


def run(cfg, run_dir) -> Loop:
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra creates it for the CLI
    loop = Loop(cfg, run_dir)
    loop.setup()
    loop.train()
    return loop


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapters.base_state_dict(model).items()}


@pytest.mark.parametrize("family,rule", [("seq2seq", "mle"), ("seq2seq", "mgs"), ("causal", "mle"), ("causal", "mgs")])
def test_only_the_adapter_trains_and_the_checkpoint_decodes_as_the_model_did(pairs, tmp_path, family, rule):
    cfg = config(pairs, tmp_path / "run", family, rule, *LORA)
    (tmp_path / "run").mkdir()
    loop = Loop(cfg, tmp_path / "run")
    loop.setup()
    model = loop.model
    assert adapters.is_adapted(model)
    before_base = base_tensors(model)
    before_adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable, _ = model.get_nb_trainable_parameters()  # peft's own count
    assert sum(p.numel() for p in before_adapter.values()) == trainable > 0
    assert all("lora_" in n for n in before_adapter)
    seen = {}
    real_setup = loop._setup_phase

    def setup_phase(phase):
        parts = real_setup(phase)
        seen["optimizer"] = [p for group in parts[1].param_groups for p in group["params"]]
        return parts

    loop._setup_phase = setup_phase
    loop.train()
    assert {id(p) for p in seen["optimizer"]} == {id(p) for p in model.parameters() if p.requires_grad}
    after = base_tensors(model)
    assert before_base.keys() == after.keys() and all(torch.equal(before_base[k], after[k]) for k in after), \
        "a base tensor changed"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before_adapter[n])]
    assert len(moved) == len(before_adapter), f"adapter tensors that did not move: {set(before_adapter) - set(moved)}"

    last = tmp_path / "run" / "checkpoints" / "last"
    assert (last / "adapter" / "adapter_config.json").is_file() and (last / "adapter" / "adapter_model.safetensors").is_file()
    saved_base = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(saved_base[k], before_base[k]) for k in saved_base) and len(saved_base) > 5
    loaded, tokenizer, _ = load_checkpoint(str(last))
    assert adapters.is_adapted(loaded)
    metric = metric_from_config(cfg.metric, level="corpus")
    sources, references = loop.val_ds["source"], loop.val_ds["references"]
    kwargs = dict(source_prefix="", max_source_length=cfg.data.max_source_length)
    mine, _ = decode_and_score(model, loop.tokenizer, sources, references, cfg.decode, [metric], **kwargs)
    theirs, _ = decode_and_score(loaded, tokenizer, sources, references, cfg.decode, [metric], **kwargs)
    assert mine == theirs


def test_the_evaluate_cli_reads_a_lora_checkpoint(pairs, tmp_path, capfd):
    cfg = config(pairs, tmp_path / "run", "seq2seq", "mle", *LORA)
    loop = run(cfg, tmp_path / "run")
    metric = metric_from_config(cfg.metric, level="corpus")
    sources, references = loop.val_ds["source"], loop.val_ds["references"]
    mine, _ = decode_and_score(loop.model, loop.tokenizer, sources, references, cfg.decode, [metric],
                               source_prefix="", max_source_length=cfg.data.max_source_length)
    out = tmp_path / "predictions.txt"
    code, _, err = run_main("mleps.evaluate", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last'}",
                            "split=validation", f"predictions={out}", "progress=false", "decode.max_new_tokens=8",
                            capfd=capfd)
    assert code == 0, err
    assert out.read_text(encoding="utf-8").splitlines() == mine


@pytest.mark.parametrize("family,rule", [("seq2seq", "mgs"), ("causal", "mle")])
def test_a_resumed_lora_run_equals_an_uninterrupted_one(pairs, tmp_path, family, rule):
    straight = run(config(pairs, tmp_path / "a", family, rule, *LORA, "trainer.max_steps=4"), tmp_path / "a")
    run(config(pairs, tmp_path / "b", family, rule, *LORA, "trainer.max_steps=2"), tmp_path / "b")
    resumed = run(config(pairs, tmp_path / "b", family, rule, *LORA, "trainer.max_steps=4", "resume=true"),
                  tmp_path / "b")
    assert resumed.state.step == straight.state.step == 4
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / name)) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last" / "optimizer.pt", weights_only=True) for r in "ab")
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_init_from_a_lora_checkpoint_continues_its_adapter_or_merges_it(pairs, tmp_path):
    first = run(config(pairs, tmp_path / "a", "seq2seq", "mle", *LORA), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "last"
    adapter = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    cont = Loop(config(pairs, tmp_path / "b", "seq2seq", "mle", *LORA, f"init_from={ckpt}"), tmp_path / "b")
    (tmp_path / "b").mkdir()
    cont.setup()
    now = {n: p for n, p in cont.model.named_parameters() if p.requires_grad}
    assert now.keys() == adapter.keys() and all(torch.equal(now[n], adapter[n]) for n in now)
    full = Loop(config(pairs, tmp_path / "c", "seq2seq", "mle", f"init_from={ckpt}"), tmp_path / "c")
    (tmp_path / "c").mkdir()
    full.setup()
    assert not adapters.is_adapted(full.model)
    assert not any("lora" in n for n, _ in full.model.named_parameters())
    # merged: the adapter's product is in the weights, so the model decodes as the adapted one does
    ids = cont.collate(cont.train_ds[:4])
    with torch.no_grad():
        a = cont.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                       decoder_input_ids=ids["decoder_input_ids"]).logits
        b = full.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                       decoder_input_ids=ids["decoder_input_ids"]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_mgs_batched_population_decoding_equals_sequential_on_a_lora_model(pairs, tmp_path, family):
    runs = {how: run(config(pairs, tmp_path / how, family, "mgs", *LORA, "trainer.max_steps=2",
                            f"trainer.decode_population={how}"), tmp_path / how) for how in ("sequential", "batched")}
    a, b = ({n: p for n, p in runs[h].model.named_parameters() if p.requires_grad} for h in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("override,needle", [
    ("model.peft=qlora", "model.peft=qlora is not one of: none, lora"),
    ("model.lora_r=0", "model.lora_r=0"),
    ("model.lora_dropout=1.5", "model.lora_dropout=1.5"),
])
def test_bad_lora_values_are_one_line_errors(pairs, tmp_path, capfd, override, needle):
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, *local(pairs), "model.peft=lora", override,
                            f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unknown_lora_target_stops_the_cli_at_start_with_exit_2_and_writes_nothing(pairs, tmp_path):
    code, _, err = run_cli("mleps.train", "trainer=mle", *TINY_CLI, *local(pairs), *LORA,
                           "model.lora_target_modules=[q_proj,qkv]", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    line = assert_user_error(code, err, "model.lora_target_modules", "qkv", "q_proj")
    assert "q_proj, qkv" not in line  # only the missing one is named as missing
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

"""Decoder-only models (mleps.families.CausalFamily, tiny_gpt2) and the completion task.

Pinned: the completion builder on hand-made documents (prefix, continuation, EOS only where the
document ends, short documents skipped and counted); left-padded batched generation equals each
row decoded alone without padding, and excludes the prompt; teacher-forced logits line up with
generation (greedy rows are the argmax of their own teacher-forced logits; a padded row scores as
it does alone); data.loss_on; batched population decoding on GPT-2 (Conv1D, tied lm_head) equals
sequential decoding token for token; every rule through the CLI on tiny GPT-2, offline, then
mleps.evaluate; the one-family options are one-line errors at start.

Tolerance: logits of a left-padded row against the same row alone: 1e-5 (float32, other matmul
shapes); tokens must be equal.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY_CLI, WORDS, assert_user_error, run_main, write_jsonl
from conftest import word_tokenizer as conftest_word_tokenizer
from mleps import population
from mleps.data import Collator, completion_pairs
from mleps.decoding import decoded_batch, eos_ids, generate
from mleps.errors import UserError
from mleps.families import CausalFamily, family_for
from mleps.trainers.base import label_tokens, token_cross_entropy
from mleps.trainers.sequences import sequence_log_probs

torch.set_num_threads(1)


def word_tokenizer():
    """One token per word, no special token appended (GPT-2's habit)."""
    return conftest_word_tokenizer(append_eos=False)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 3, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2,
                                       eos_token_id=2, pad_token_id=0))
    model.generation_config.max_length = None
    model.generation_config.pad_token_id = 0
    return model.eval()


PROMPTS = ["a b c d e", "f", "g h i", "j k l m n o p a"]


def test_completion_builder_on_hand_made_documents(caplog):
    import datasets

    docs = datasets.Dataset.from_dict({"source": ["a b c d e f g", "a b c d", "a b", "h i j", "k l m n o"],
                                       "target": [""] * 5, "references": [[]] * 5})
    cfg = OmegaConf.create({"prefix_tokens": 3, "continuation_tokens": 2})
    tok = word_tokenizer()
    with caplog.at_level(logging.WARNING, logger="mleps"):
        pairs = completion_pairs(docs, tok, cfg, "train")
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    assert pairs["source"] == ["a b c", "a b c", "k l m"]
    assert pairs["input_ids"] == [ids("a b c"), ids("a b c"), ids("k l m")]
    # cut at 2 tokens before the document ends: no EOS; the document ends within 2 tokens: EOS
    assert pairs["labels"] == [ids("d e"), ids("d") + [eos], ids("n o") + [eos]]
    assert pairs["target"] == ["d e", "d", "n o"] and pairs["references"] == [["d e"], ["d"], ["n o"]]
    assert pairs["ends_document"] == [False, True, True]
    assert "skipped 2 of 5 documents" in caplog.text  # "a b" and "h i j": no token after the prefix

    # whole_documents: only the documents that end within prefix + continuation tokens, counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mleps"):
        whole = completion_pairs(docs, tok, OmegaConf.merge(cfg, {"whole_documents": True}), "train")
    assert whole["source"] == ["a b c", "k l m"] and all(labels[-1] == eos for labels in whole["labels"])
    assert "keeps the 2 of 3 documents" in caplog.text
    with pytest.raises(UserError, match="whole_documents"):
        completion_pairs(docs.select([0]), tok, OmegaConf.merge(cfg, {"whole_documents": True}), "train")


def test_causal_batch_layout_and_loss_on():
    tok, model = word_tokenizer(), tiny_gpt2()
    rows = {"input_ids": [tok(p)["input_ids"] for p in PROMPTS], "labels": [[3, 4, 2], [5], [6, 7], [8, 9, 10, 2]],
            "source": PROMPTS, "references": [["x"]] * 4}
    batch = Collator(tok, model)(rows)
    assert (batch["attention_mask"][:, -1] == 1).all(), "prompts are left-padded"
    assert batch["input_ids"][1].tolist() == [0] * 7 + tok("f")["input_ids"]
    # loss_on=all: every prompt token but the first, and every continuation token
    assert label_tokens(batch) == sum(len(p.split()) - 1 for p in PROMPTS) + 10
    only = Collator(tok, model, "continuation")(rows)
    assert label_tokens(only) == 10 and (only["prompt_labels"] == -100).all()
    # the loss is the per-row sum of -log p of those tokens, each row scored alone without padding
    loss, n = token_cross_entropy(model, batch)
    alone = 0.0
    for prompt, cont in zip(rows["input_ids"], rows["labels"]):
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            alone += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    assert n == label_tokens(batch) and float(loss.detach()) == pytest.approx(alone, rel=1e-5)


def test_left_padded_generation_equals_each_row_alone_and_excludes_the_prompt():
    tok, model = word_tokenizer(), tiny_gpt2()
    family = family_for(model)
    assert isinstance(family, CausalFamily)
    batch = family.encode_sources(tok, PROMPTS, 32)
    assert batch["attention_mask"][:, 0].tolist() != [1] * 4 and (batch["attention_mask"][:, -1] == 1).all()
    rows = generate(model, batch, max_new_tokens=10)
    assert rows.shape[1] <= 11 and (rows[:, 0] == 0).all(), "a start column then the output, never the prompt"
    eos = eos_ids(model)
    together = decoded_batch(rows, tok, eos, [["x"]] * 4)
    for i, prompt in enumerate(PROMPTS):
        ids = tok([prompt], return_tensors="pt")
        alone_rows = generate(model, ids, max_new_tokens=10)
        alone = decoded_batch(alone_rows, tok, eos, [["x"]])
        assert together.token_ids[i] == alone.token_ids[0], prompt
        assert together.ended_with_eos[i] == alone.ended_with_eos[0]
        # what generate appended to the prompt, read directly
        full = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert full[0, ids["input_ids"].shape[1]:].tolist()[:len(alone.token_ids[0])] == alone.token_ids[0]


def test_teacher_forced_logits_line_up_with_generation():
    tok, model = word_tokenizer(), tiny_gpt2()
    family = family_for(model)
    batch = family.encode_sources(tok, PROMPTS, 32)
    rows = generate(model, batch, max_new_tokens=6)
    with torch.no_grad():
        logits = family.logits(model, batch, rows)
    assert logits.shape[:2] == (4, rows.shape[1] - 1)
    # greedy: each generated token is the argmax of its own teacher-forced logits (before EOS)
    decoded = decoded_batch(rows, tok, eos_ids(model), [["x"]] * 4)
    for i, tokens in enumerate(decoded.token_ids):
        assert logits[i, :len(tokens)].argmax(-1).tolist() == tokens
    # a padded row's log-probabilities are the row's alone
    log_probs, lengths = sequence_log_probs(model, batch, rows, torch.arange(4), eos_ids(model))
    for i, prompt in enumerate(PROMPTS):
        ids = tok([prompt], return_tensors="pt")
        alone, _ = sequence_log_probs(model, ids, rows[i:i + 1], torch.tensor([0]), eos_ids(model))
        assert float(log_probs[i]) == pytest.approx(float(alone[0]), abs=1e-5)


def test_batched_population_decoding_on_gpt2_equals_sequential_decoding():
    from test_population import perturbed_stacks, sequential

    tok, model = word_tokenizer(), tiny_gpt2()
    batch = family_for(model).encode_sources(tok, PROMPTS, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    population.check_supported(model, params)  # Conv1D, LayerNorm, Embedding, the tied lm_head
    stacks = perturbed_stacks(params, 4, 0.5)
    with population.population(model, dict(zip(params, stacks))):
        batched = population.decode(model, batch, 4, max_new_tokens=10)
    one_by_one = sequential(model, params, stacks, lambda m: generate(m, batch, max_new_tokens=10))
    assert len({tuple(map(tuple, ids.tolist())) for ids in one_by_one}) > 1, "the perturbations change the outputs"
    for a, b in zip(batched, one_by_one):
        assert a.tolist() == b.tolist()


# -- every rule through the CLI, offline --------------------------------------------------------

TINY_GPT2 = ["data=completion", "model=tiny_gpt2", *TINY_CLI, "data.prefix_tokens=5", "data.continuation_tokens=8",
             "decode.max_new_tokens=10"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory, data_dir):
    """The first AESLC emails as a small local completion corpus."""
    folder = tmp_path_factory.mktemp("docs")
    rows = []
    with open(data_dir / "aeslc" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append({"text": json.loads(line)["email_body"]})
            if len(rows) == 48:
                break
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "dev.jsonl", rows[:6])


def data_overrides(documents) -> list[str]:
    return [f"data.train_file={documents[0]}", f"data.validation_file={documents[1]}",
            f"data.test_file={documents[1]}", "data.text_column=text"]


RULES = {
    "mle": [],
    "pg": ["metric=edit", "trainer.num_samples=2", "trainer.max_new_tokens=8"],
    "mrt": ["metric=edit", "trainer.num_samples=2", "trainer.max_new_tokens=8"],
    "mgs": ["metric=repetition", "trainer.warm_start_steps=0", "trainer.num_samples=2", "trainer.max_new_tokens=8",
            "trainer.decode_population=batched"],
}


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory, documents):
    """tiny_gpt2 as every run below starts: one MLE step at lr 0 saves it."""
    from safetensors.torch import load_file

    run = tmp_path_factory.mktemp("init") / "run"
    code = run_main_plain("mleps.train", *TINY_GPT2, *data_overrides(documents), "trainer=mle", "trainer.max_steps=1",
                          "trainer.lr=0", "trainer.batch_size=4", f"output_dir={run}")
    assert code == 0
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def run_main_plain(module: str, *overrides: str) -> int:
    """run_main without capfd (module-scoped fixtures have none)."""
    class _Capture:
        def readouterr(self):
            return "", ""
    return run_main(module, *overrides, capfd=_Capture())[0]


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_tiny_gpt2_through_the_cli(tmp_path, capfd, documents, initial_weights, rule):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = [*TINY_GPT2, *data_overrides(documents), f"trainer={rule}", "trainer.batch_size=4", "trainer.log_every=1",
              "trainer.eval_every=2", "trainer.lr=1e-2", "trainer.schedule=constant", "trainer.warmup_steps=0",
              *RULES[rule]]
    code, _, err = run_main("mleps.train", *common, "trainer.max_steps=2", f"output_dir={run}", capfd=capfd)
    assert code == 0, err
    after = load_file(run / "checkpoints" / "last" / "model.safetensors")
    changed = [k for k in after if not torch.equal(initial_weights[k], after[k])]
    assert changed, "training did not move the weights"
    code, out, err = run_main("mleps.evaluate", f"checkpoint={run / 'checkpoints' / 'last'}", "progress=false",
                              "decode.max_new_tokens=10", "eval.metrics=[repetition,nontermination,edit]",
                              capfd=capfd)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data"] == "completion" and result["n"] == 6
    for key in ("repetition", "nontermination", "edit", "perplexity", "cross_entropy"):
        assert key in result


@pytest.mark.parametrize("override,needle", [
    ("model=tiny_marian", "needs a decoder-only model"),
    ("data.loss_on=everything", "data.loss_on=everything"),
    ("data.text_column=body", "text column 'body' not found"),
    ("data.prefix_tokens=0", "data.prefix_tokens=0"),
    ("data.prefix_tokens=100", "data.max_source_length"),
    ("model.max_positions=12", "model.max_positions=12"),
    ("data.task=summarise", "data.task=summarise"),
])
def test_bad_completion_options_are_one_line_errors(tmp_path, capfd, documents, override, needle):
    run = tmp_path / "run"
    code, _, err = run_main("mleps.train", *TINY_GPT2, *data_overrides(documents), "trainer=mle",
                            "trainer.max_steps=1", f"output_dir={run}", override, capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (run / "metrics.jsonl").exists()


def test_a_one_family_option_with_the_other_family_is_one_line(tmp_path, capfd):
    code, _, err = run_main("mleps.train", "trainer=mle", *TINY_CLI, "data.loss_on=continuation",
                            f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, "data.loss_on=continuation", "decoder-only")
    code, _, err = run_main("mleps.train", "trainer=mle", "model=tiny_gpt2", *TINY_CLI,
                            f"output_dir={tmp_path / 'run2'}", capfd=capfd)
    assert_user_error(code, err, "data.task=completion")


def test_model_hf_loads_a_decoder_only_checkpoint_as_a_causal_lm(tmp_path):
    from mleps.errors import UserError
    from mleps.models import from_pretrained

    tiny_gpt2().save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = from_pretrained(str(tmp_path))  # model.kind=auto: the config says decoder-only
    assert isinstance(model, GPT2LMHeadModel) and family_for(model).name == "causal"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 0
    assert isinstance(from_pretrained(str(tmp_path), kind="causal")[0], GPT2LMHeadModel)
    with pytest.raises(UserError, match="could not load model"):
        from_pretrained(str(tmp_path), kind="seq2seq")  # a GPT-2 config is no encoder-decoder


def test_the_lm_task_loss_scores_continuations_given_their_prompt():
    """metric=lm on a decoder-only model: mean NLL per token of each output given its own prompt."""
    from mleps.losses import LMScore

    tok, model = word_tokenizer(), tiny_gpt2()
    batch = family_for(model).encode_sources(tok, PROMPTS, 32)
    rows = generate(model, batch, max_new_tokens=6, do_sample=True)
    lm = LMScore(level="sentence", tokens_per_forward=1)  # one row per forward
    lm.bind(model, tok)
    decoded = decoded_batch(rows, tok, eos_ids(model), [["x"]] * 4, batch=batch)
    log_probs, lengths = sequence_log_probs(model, batch, rows, torch.arange(4), eos_ids(model))
    expected = (-log_probs.detach() / lengths).tolist()
    assert lm.sentence_losses(decoded) == pytest.approx(expected, abs=1e-5)


def test_documents_from_a_txt_file_and_a_csv_column(tmp_path):
    from mleps.data import load_split

    (tmp_path / "docs.txt").write_text("first document here\n\nsecond one\n", encoding="utf-8")
    (tmp_path / "docs.csv").write_text('id,body\n1,"one, two"\n2,three\n', encoding="utf-8")
    base = {"task": "completion", "prefix_tokens": 1, "continuation_tokens": 4, "max_train_examples": None,
            "max_eval_examples": None, "reference_columns": [], "name": "t"}
    txt = load_split(OmegaConf.create({**base, "train_file": str(tmp_path / "docs.txt"), "text_column": None}), "train")
    assert txt["source"] == ["first document here", "second one"]  # one document per non-empty line
    csv = load_split(OmegaConf.create({**base, "train_file": str(tmp_path / "docs.csv"), "text_column": "body"}), "train")
    assert csv["source"] == ["one, two", "three"]


def test_tiny_gpt2_tokenizer_appends_no_eos_and_is_cached(tmp_path, data_dir, caplog):
    from conftest import compose_cfg
    from mleps.data import load_split
    from mleps.models import load_model_and_tokenizer

    cfg = compose_cfg("data=completion", "model=tiny_gpt2", "trainer=mle", f"data_dir={data_dir}",
                      f"cache_dir={tmp_path}", "data.max_train_examples=64", "model.vocab_size=300",
                      "model.d_model=32", "model.layers=1", "model.heads=2", "model.ffn_dim=64")
    docs = load_split(cfg.data, "train")
    model, tok, _ = load_model_and_tokenizer(cfg, docs)
    assert isinstance(model, GPT2LMHeadModel) and len(tok) == model.config.vocab_size <= 300
    ids = tok("Thanks, see you")["input_ids"]
    assert tok.eos_token_id not in ids and tok.decode(ids) == "Thanks, see you"
    with caplog.at_level(logging.INFO, logger="mleps"):
        load_model_and_tokenizer(cfg, docs)
    assert "tokenizer: reusing" in caplog.text


def test_wikitext_export_groups_lines_into_articles():
    """scripts/export_wikitext103.py (run online only): level-1 headings start articles, sections do not."""
    from scripts.export_wikitext103 import articles

    lines = ["", " = Apollo = ", "", " Apollo is a god . ", " = = Cult = = ", " Temples . ", "",
             " = Zeus = ", " Zeus rules . ", ""]
    assert list(articles(lines)) == ["= Apollo =\nApollo is a god .\n= = Cult = =\nTemples .", "= Zeus =\nZeus rules ."]


def test_the_wikitext103_config_composes_as_a_completion_task():
    from conftest import compose_cfg

    cfg = compose_cfg("data=wikitext103", "model=hf", "model.name_or_path=gpt2")
    assert cfg.data.task == "completion" and cfg.data.text_column == "text"
    # the reference code's sequences: paragraphs (non-empty lines), those of <= 10 tokens dropped
    assert (cfg.data.prefix_tokens, cfg.data.sequences, cfg.data.min_sequence_tokens) == (10, "paragraphs", 10)
    assert cfg.data.train_file.endswith("wikitext103/train.jsonl")

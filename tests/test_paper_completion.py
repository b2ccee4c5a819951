"""The paper's completion setting: whole sequences, token-budget batches, the length-ratio decode
limit, the summed-NLL LM loss, per-continuation seq-rep-4 and the mgs_paper preset's proposal."""
from __future__ import annotations

import logging
import math

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import assert_user_error, compose_cfg, run_main, word_tokenizer as conftest_word_tokenizer
from mleps.data import TokenBudgetStream, completion_pairs, load_split
from mleps.decoding import DecodedBatch, decoded_batch, eos_ids, generate
from mleps.errors import UserError
from mleps.families import family_for
from mleps.losses import LMScore, SeqRep, build_task_loss


def word_tokenizer():
    return conftest_word_tokenizer(append_eos=False)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=19, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2,
                                       eos_token_id=2, pad_token_id=0))
    model.generation_config.max_length = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def data_cfg(path, **kw):
    return OmegaConf.create({"name": "t", "task": "completion", "train_file": str(path), "text_column": "text",
                             "prefix_tokens": 2, "continuation_tokens": 3, "max_train_examples": None,
                             "max_eval_examples": None, "reference_columns": [], "sequences": "paragraphs",
                             "min_sequence_tokens": 3, "max_sequence_tokens": None, **kw})


# -- data ------------------------------------------------------------------------------------------
def test_paragraphs_of_a_text_file_are_whole_sequences_ending_in_eos(tmp_path, caplog):
    (tmp_path / "t.txt").write_text("a b c d e f\n\n  a b\nc d e f g h i j\n   \ng h i\n", encoding="utf-8")
    tok = word_tokenizer()
    cfg = data_cfg(tmp_path / "t.txt")
    with caplog.at_level(logging.WARNING, logger="mleps"):
        paragraphs = load_split(cfg, "train")  # the 4 non-empty lines, stripped
        assert list(paragraphs["source"]) == ["a b c d e f", "a b", "c d e f g h i j", "g h i"]
        pairs = completion_pairs(paragraphs, tok, cfg, "train")
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    # "a b" (2 tokens) and "g h i" (3) have at most min_sequence_tokens=3 tokens: dropped and counted
    assert list(pairs["source"]) == ["a b", "c d"]
    assert list(pairs["labels"]) == [ids("c d e f") + [tok.eos_token_id], ids("e f g h i j") + [tok.eos_token_id]]
    assert list(pairs["references"]) == [["c d e f"], ["e f g h i j"]]
    assert "dropped 2 of 4 paragraphs" in caplog.text


def test_documents_keep_each_row_whole_and_long_ones_are_dropped_and_counted(tmp_path, caplog):
    import json

    rows = [{"body": "a b c d\ne f g"}, {"body": "a b c d e f g h i j k l"}, {"body": "h i j k"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = data_cfg(tmp_path / "d.jsonl", sequences="documents", text_column="body", max_sequence_tokens=8)
    tok = word_tokenizer()
    with caplog.at_level(logging.WARNING, logger="mleps"):
        pairs = completion_pairs(load_split(cfg, "train"), tok, cfg, "train")
    assert list(pairs["source"]) == ["a b", "h i"]  # the 12-token email is over max_sequence_tokens=8
    assert [labels[-1] for labels in pairs["labels"]] == [tok.eos_token_id] * 2
    assert "1 of more than data.max_sequence_tokens=8" in caplog.text


def test_a_file_without_a_usable_paragraph_is_a_user_error(tmp_path):
    (tmp_path / "t.txt").write_text("a b\nc\n", encoding="utf-8")
    cfg = data_cfg(tmp_path / "t.txt")
    with pytest.raises(UserError, match="no usable paragraph"):
        completion_pairs(load_split(cfg, "train"), word_tokenizer(), cfg, "train")


def test_token_budget_batches_cover_every_sequence_once_per_epoch_sorted_by_length():
    lengths = [3, 17, 5, 5, 9, 40, 2, 11, 8, 8, 30, 6, 7, 12, 4, 25]
    ds = datasets.Dataset.from_dict({"x": list(range(len(lengths)))})
    stream = TokenBudgetStream(ds, 48, lengths, seed=3)
    batches = [stream.global_indices(step) for step in range(len(stream.batches))]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each exactly once in epoch 0
    for b in stream.batches:  # within the budget (a sequence longer than it is a batch of its own)
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 48
    flat = [lengths[i] for b in stream.batches for i in b]
    assert flat == sorted(flat)  # cut from the length-sorted order
    # a pure function of (seed, step): another stream agrees; the next epoch is another order of the same batches
    again = TokenBudgetStream(ds, 48, lengths, seed=3)
    n = len(stream.batches)
    assert [again.global_indices(s) for s in range(2 * n)] == [stream.global_indices(s) for s in range(2 * n)]
    assert sorted(map(tuple, (stream.global_indices(n + s) for s in range(n)))) == sorted(map(tuple, batches))
    # two processes split a step's rows [j::2]: the batches of one process with 2 accumulation steps,
    # each micro-batch within the budget
    r0, r1 = (TokenBudgetStream(ds, 24, lengths, seed=3, rank=r, world_size=2) for r in (0, 1))
    accumulating = TokenBudgetStream(ds, 24, lengths, seed=3, accumulation=2)
    assert r0.batches == accumulating.batches and all(len(b) >= 2 for b in r0.batches)
    for step in range(len(r0.batches)):
        assert sorted(r0.indices(step) + r1.indices(step)) == sorted(accumulating.global_indices(step))


def test_fewer_sequences_than_micro_batches_is_a_user_error():
    ds = datasets.Dataset.from_dict({"x": [0]})
    with pytest.raises(UserError, match="micro-batches"):
        TokenBudgetStream(ds, 10, [9], seed=0, world_size=2)


# -- the length-ratio decode limit -------------------------------------------------------------------
def test_training_decodes_stop_at_a_ratio_of_the_longest_reference():
    from mleps.trainers.base import UpdateRule

    rule = UpdateRule.__new__(UpdateRule)
    labels = torch.tensor([[5, 6, 7, 2, -100, -100], [5, 6, 7, 8, 9, 2]])  # longest: 6 tokens with EOS
    rule.cfg = OmegaConf.create({"max_new_tokens": 100, "max_length_ratio": 1.3})
    assert rule.max_new_tokens({"labels": labels}) == math.ceil(1.3 * 6)
    rule.cfg = OmegaConf.create({"max_new_tokens": 5, "max_length_ratio": 1.3})
    assert rule.max_new_tokens({"labels": labels}) == 5  # never past trainer.max_new_tokens
    rule.cfg = OmegaConf.create({"max_new_tokens": 100, "max_length_ratio": None})
    assert rule.max_new_tokens({"labels": labels}) == 100


# -- task losses -------------------------------------------------------------------------------------
def test_seq_rep_is_the_per_continuation_mean_over_outputs_of_at_least_n_tokens():
    eos = 2
    rows = torch.tensor([[0, 3, 4, 3, 4, 3, 4, eos, 5, 5, 5, 5],  # 3 4 3 4 3 4: 3 4-grams, 2 unique -> 1/3
                         [0, 5, 6, 7, 8, 9, eos, 0, 0, 0, 0, 0],  # no repeat -> 0
                         [0, 5, 6, eos, 0, 0, 0, 0, 0, 0, 0, 0],  # 2 tokens: left out of the mean
                         [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]])  # 11 tokens, no EOS: 8 4-grams, 1 unique -> 7/8
    decoded = decoded_batch(rows, word_tokenizer(), [eos], [["x"]] * 4)
    loss = SeqRep(n=4)
    expected = (1 / 3 + 0 + 7 / 8) / 3
    assert loss.loss(decoded) == pytest.approx(expected)
    assert loss.sentence_losses(decoded) == pytest.approx([1 / 3, 0.0, 0.0, 7 / 8])
    # metric=repetition pools the counts instead: (1 + 0 + 7) repeated of (3 + 2 + 8) 4-grams
    assert build_task_loss("repetition").loss(decoded) == pytest.approx(8 / 13)


def test_summed_lm_loss_is_the_whole_sequence_nll_under_the_frozen_model():
    tok, model = word_tokenizer(), tiny_gpt2()
    prompts = ["a b c", "d", "e f g h"]
    batch = family_for(model).encode_sources(tok, prompts, 32)  # left-padded
    rows = generate(model, batch, max_new_tokens=5, do_sample=True)
    decoded = decoded_batch(rows, tok, eos_ids(model), [["x"]] * 3, batch=batch)
    lm = LMScore(level="sentence", reduction="sum", tokens_per_forward=1)
    lm.bind(model, tok)
    expected = []
    with torch.no_grad():
        for prompt, tokens, ended in zip(prompts, decoded.token_ids, decoded.ended_with_eos):
            ids = tok(prompt)["input_ids"] + tokens + ([2] if ended else [])
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            expected.append(-float(log_probs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum()))
    assert lm.sentence_losses(decoded) == pytest.approx(expected, rel=1e-5)
    assert LMScore(reduction="sum").__class__ is LMScore
    corpus = LMScore(reduction="sum")
    corpus.bind(model, tok)
    assert corpus.loss(decoded) == pytest.approx(sum(expected) / 3, rel=1e-5)  # the mean over outputs
    per_token = LMScore(level="sentence", reduction="mean")
    per_token.bind(model, tok)
    assert all(m < s for m, s in zip(per_token.sentence_losses(decoded), expected))
    with pytest.raises(ValueError, match="reduction"):
        LMScore(reduction="median")


# -- the mgs_paper preset ----------------------------------------------------------------------------
def test_the_paper_preset_draws_the_reference_proposal_on_a_tiny_model():
    """guided centre θ - g (g clipped to norm 1), noise randn x mean|g_j| per tensor, K = 4 half guided,
    weights softmax(β(C(θ) - C(θ+Δ)) - log q) with the reference's unit-variance mixture q, β = 1."""
    from mleps.search import apply_perturbation_, compute_noise_scales, draw_samples, importance_weights
    from mleps.trainers.mgs import search_config

    cfg = compose_cfg("trainer=mgs_paper", "data_dir=/d").trainer
    assert (cfg.name, cfg.guide, cfg.guide_max_norm, cfg.apply, cfg.update_max_norm) == ("mgs", "scaled", 1.0,
                                                                                        "optimizer", 1.0)
    assert (cfg.lr, cfg.weight_decay, cfg.schedule, cfg.max_length_ratio) == (6.25e-5, 0.01, "constant", 1.3)
    search = search_config(cfg)
    tok, model = word_tokenizer(), tiny_gpt2()
    batch = family_for(model).encode_sources(tok, ["a b c d e f g", "h i j k l m"], 32)
    model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.guide_max_norm)  # what MGS._guide does
    guide = [p.grad.detach().clone() for p in params]
    assert math.isclose(math.sqrt(sum(float(g.square().sum()) for g in guide)), 1.0, rel_tol=1e-5)
    sigma = compute_noise_scales(search, guide, len(guide))
    assert sigma == pytest.approx([float(g.abs().mean()) for g in guide])

    samples = draw_samples(search, torch.Generator().manual_seed(0))
    assert sorted(s.component for s in samples) == [0, 0, 1, 1]
    stats = []
    for sample in samples:
        delta = [torch.zeros_like(p) for p in params]
        stats.append(apply_perturbation_(delta, guide, search, sample, sigma))
        centre = [-g * sample.component for g in guide]  # 0, or θ - g
        z = torch.cat([((d - c) / s).flatten() for d, c, s in zip(delta, centre, sigma) if s > 0])
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05, (sample, z.mean(), z.std())
        expected_sq = sum(float(d.double().square().sum()) for d in delta)
        assert stats[-1].delta_sq_norm == pytest.approx(expected_sq, rel=1e-4)

    losses, base = [5.0, 4.0, 6.5, 5.5], 5.2
    log_weights, _ = importance_weights(search, samples, losses, base, stats)
    log_q = torch.tensor([math.log(0.5 * math.exp(-st.delta_sq_norm / 2)
                                   + 0.5 * math.exp(-(st.delta_sq_norm - 2 * st.delta_dot_mean + st.mean_sq_norm) / 2))
                          for st in stats], dtype=torch.float64)
    expected = torch.log_softmax(1.0 * (base - torch.tensor(losses, dtype=torch.float64)) - log_q, 0)
    assert torch.allclose(log_weights, expected, atol=1e-9)


# -- bad input ---------------------------------------------------------------------------------------
COMPLETION = ["data=completion", "model=tiny_gpt2", "model.vocab_size=300", "model.d_model=32", "model.layers=1",
              "model.heads=2", "model.ffn_dim=64", "progress=false", "cpu=true", "trainer=mle", "trainer.max_steps=1"]


@pytest.mark.parametrize("override,needle", [
    ("metric.reduction=median", "reduction"),
    ("trainer.max_length_ratio=0", "trainer.max_length_ratio=0"),
    ("data.max_sequence_tokens=5", "data.max_sequence_tokens=5"),
    ("data.sequences=chapters", "data.sequences=chapters"),
    ("data.max_sequence_tokens=null", "needs data.max_sequence_tokens"),
])
def test_bad_paper_setting_options_fail_at_start(override, needle, tmp_path, capfd):
    extra = ["metric=lm", "data.sequences=documents", "data.max_sequence_tokens=200"]
    code, _, err = run_main("mleps.train", *COMPLETION, *extra, override, f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_text_file_with_no_usable_paragraph_fails_at_start(tmp_path, capfd):
    (tmp_path / "t.txt").write_text("one two\n\nthree\n", encoding="utf-8")
    code, _, err = run_main("mleps.train", *COMPLETION, f"data.train_file={tmp_path / 't.txt'}",
                            "data.validation_file=null", "data.sequences=paragraphs", "data.max_sequence_tokens=200",
                            f"output_dir={tmp_path / 'run'}", capfd=capfd)
    assert_user_error(code, err, "no usable paragraph")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

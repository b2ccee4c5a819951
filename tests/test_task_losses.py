"""The task-loss contract (mleps.task_loss, mleps.losses): hand-computed values on tiny inputs,
EOS handling, additivity, composites, `lm` against plain transformers, bad input."""
from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from sacrebleu.metrics import BLEU, CHRF
from transformers import MarianConfig, MarianMTModel

from mleps.config import MRTConfig, PGConfig, metric_schema
from mleps.decoding import DecodedBatch, decoded_batch
from mleps.errors import UserError
from mleps.losses import Custom, EditDistance, LMScore, Repetition, build_task_loss, levenshtein
from mleps.metrics import SacrebleuPrivate, build_metric
from mleps.metrics_config import metric_from_config
from mleps.task_loss import TASK_LOSSES, TaskLoss

START, PAD, EOS = 0, 1, 2


class WordTokenizer:
    """Token t > 2 is the word "w<t>"; the special tokens vanish as with skip_special_tokens=True."""

    def batch_decode(self, ids, **kwargs):
        return [" ".join(f"w{t}" for t in row if t > 2) for row in ids.tolist()]


def decode(rows, refs):
    return decoded_batch(torch.tensor(rows), WordTokenizer(), [EOS], refs)


# max_new_tokens = 5: row 0 is cut at the limit, row 1 emits EOS as its 5th token, row 2 stops early
ROWS = [[START, 5, 6, 5, 6, 5], [START, 7, 8, 7, 8, EOS], [START, 9, EOS, PAD, PAD, PAD]]
REFS = [["w5 w6 w5"], ["w7 w8", "w7 w8 w7 w8 w9 w9"], ["w3 w9"]]


def test_decoded_batch_eos_handling():
    d = decode(ROWS, REFS)
    assert d.ended_with_eos == [False, True, True]  # EOS exactly at the limit is terminated
    assert d.token_ids == [[5, 6, 5, 6, 5], [7, 8, 7, 8], [9]]
    assert d.lengths == [5, 4, 1]
    assert d.texts == ["w5 w6 w5 w6 w5", "w7 w8 w7 w8", "w9"]


def test_nontermination_counts_outputs_cut_at_the_limit():
    for level in ("corpus", "sentence"):
        loss = build_task_loss("nontermination", level)
        assert loss.sentence_losses(decode(ROWS, REFS)) == [1.0, 0.0, 0.0]
        assert loss.loss(decode(ROWS, REFS)) == pytest.approx(1 / 3)


def test_repetition_by_hand():
    d = decode(ROWS, REFS)
    # n=2: row 0 bigrams 56 65 56 65 -> 2 repeated of 4; row 1: 78 87 78 -> 1 of 3; row 2: none
    loss = Repetition("sentence", n=2)
    assert loss.sentence_losses(d) == pytest.approx([0.5, 1 / 3, 0.0])
    assert loss.loss(d) == pytest.approx((0.5 + 1 / 3) / 3)
    corpus = Repetition("corpus", n=2)
    np.testing.assert_array_equal(corpus.stats(d), [3, 7])
    assert corpus.loss(d) == pytest.approx(3 / 7)
    assert Repetition(n=4).sentence_losses(d) == pytest.approx([0.0, 0.0, 0.0])  # 2 distinct 4-grams in row 0


def test_edit_distance_by_hand_and_rapidfuzz_equals_python():
    d = DecodedBatch(texts=["a b c", "x"], token_ids=[[], []], ended_with_eos=[True, True],
                     references=[["a x c", "a b c d"], ["y z"]])
    # word level: min(1/3, 1/4); "x" vs "y z": 2 edits / 2 words
    assert EditDistance("sentence").sentence_losses(d) == pytest.approx([0.25, 1.0])
    # chars: "a x c" is 1 edit of 5 (0.2), "a b c d" 2 of 7: the closer one counts
    assert EditDistance("sentence", unit="char").sentence_losses(d)[0] == pytest.approx(0.2)
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        from rapidfuzz.distance import Levenshtein
        assert Levenshtein.distance(a, b) == levenshtein(a, b)


def test_length_by_hand():
    d = DecodedBatch(texts=["a b c", "a"], token_ids=[[], []], ended_with_eos=[True, True],
                     references=[["a b", "a b c d e"], ["a b c d"]])
    # closest reference lengths 2 and 4: |3/2 - 1| = 0.5, |1/4 - 1| = 0.75; corpus |4/6 - 1| = 1/3
    assert build_task_loss("length", "sentence").loss(d) == pytest.approx(0.625)
    assert build_task_loss("length", "corpus").loss(d) == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge", "repetition", "nontermination", "edit", "length"])
@pytest.mark.parametrize("level", ["corpus", "sentence"])
def test_statistics_are_additive(name, level):
    d = decode(ROWS, REFS)
    loss = build_task_loss(name, level)
    halves = loss.stats(d.select([0])) + loss.stats(d.select([1, 2]))
    np.testing.assert_allclose(halves, loss.stats(d))
    assert loss.loss_from_stats(halves) == pytest.approx(loss.loss(d))
    assert len(loss.stats(d)) == loss.num_stats


def test_text_metrics_through_the_contract_are_unchanged():
    d = decode(ROWS, REFS)
    bleu = build_metric("bleu")
    assert bleu.loss(d) == pytest.approx(1 - sacrebleu.corpus_bleu(d.texts, [[r[0] for r in REFS],
                                                                              [None, REFS[1][1], None]]).score / 100)
    assert bleu.sentence_losses(d) == pytest.approx([1 - bleu.sentence_scores([h], [r])[0] / 100
                                                     for h, r in zip(d.texts, REFS)])


def test_sacrebleu_private_adapter_matches_the_public_api():
    """Fails if sacrebleu changes the private calls mleps.metrics makes (one adapter holds them all)."""
    hyps, refs = ["the cat sat on a mat", "hello there"], ["the cat sat on the mat", "hello world there"]
    for obj, public in ((BLEU(), sacrebleu.corpus_bleu), (CHRF(), sacrebleu.corpus_chrf)):
        seg = SacrebleuPrivate.segment_stats(obj, hyps, [refs])
        total = np.asarray(seg).sum(0).tolist()
        assert SacrebleuPrivate.score_from_stats(obj, total).score == pytest.approx(public(hyps, [refs]).score)
    seg = SacrebleuPrivate.segment_stats(CHRF(), hyps[:1], [refs[:1]])
    assert SacrebleuPrivate.score_from_stats(CHRF(), seg[0]).score == pytest.approx(
        sacrebleu.sentence_chrf(hyps[0], refs[:1]).score)


def metric_node(name: str, **options):
    """metric=<name>'s config node with `options` (a name no loss has: the plain values)."""
    if name not in TASK_LOSSES:
        return OmegaConf.create({"name": name, **options})
    return OmegaConf.merge(OmegaConf.structured(metric_schema(name)), options)


def test_composite_is_the_weighted_sum_and_concatenates_statistics():
    d = decode(ROWS, REFS)
    comp = metric_from_config(metric_node(name="composite", losses=["nontermination", "repetition"], weights=[2, "0.5"],
                                          n=2))
    assert comp.loss(d) == pytest.approx(2 * (1 / 3) + 0.5 * (3 / 7))
    assert len(comp.stats(d)) == 4
    halves = comp.stats(d.select([0, 1])) + comp.stats(d.select([2]))
    assert comp.loss_from_stats(halves) == pytest.approx(comp.loss(d))
    assert comp.sentence_losses(d) == pytest.approx([2 * 1 + 0.5 * 0.5, 0.5 / 3, 0.0])


@pytest.mark.parametrize("options, needle", [
    (dict(name="nope"), "unknown metric 'nope'"),
    (dict(name="composite", losses=["bleu", "length"], weights=[1, "abc"]), "'abc', not a number"),
    (dict(name="composite", losses=["bleu"], weights=[1, 2]), "equal, non-zero length"),
    (dict(name="composite", losses=["bleu", "nope"], weights=[1, 2]), "unknown metric 'nope'"),
    (dict(name="custom", fn="no_such_module_xyz:fn"), "cannot be imported"),
    (dict(name="custom", fn="math:no_such_fn"), "cannot be imported"),
    (dict(name="custom", fn="math"), "package.module:function"),
    (dict(name="lm", score_model="/no/such/checkpoint"), "is not a folder"),
    (dict(name="repetition", n=0), "n >= 1"),
])
def test_bad_options_are_user_errors(options, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        metric_from_config(metric_node(**options))


def returns_words(decoded):
    return [len(t.split()) for t in decoded.texts]


def returns_nan(decoded):
    return [float("nan")] * len(decoded)


def returns_short(decoded):
    return [0.0]


def returns_text(decoded):
    return "abc"


@pytest.mark.parametrize("fn, needle", [("returns_nan", "non-finite"), ("returns_short", "returned 1 values for 3"),
                                        ("returns_text", "one float per output")])
def test_custom_checks_what_the_callable_returns(fn, needle):
    d = decode(ROWS, REFS)
    assert Custom(fn=f"{__name__}:returns_words").loss(d) == pytest.approx((5 + 4 + 1) / 3)
    with pytest.raises(UserError, match=needle):
        Custom(fn=f"{__name__}:{fn}").stats(d)


class CorpusOnly(TaskLoss):
    name = "corpus_only"

    def corpus_stats(self, decoded):
        return np.array([1.0, 1.0])


def test_pg_and_mrt_refuse_a_loss_without_a_sentence_form():
    from mleps.trainers import build_rule

    model = MarianMTModel(MarianConfig(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=1, decoder_attention_heads=1, encoder_ffn_dim=8,
                                       decoder_ffn_dim=8, pad_token_id=PAD, eos_token_id=EOS,
                                       decoder_start_token_id=START))
    assert build_task_loss("composite", losses=["bleu", "lm"], weights=[1, 1]).has_sentence_form
    for rule, schema in (("pg", PGConfig), ("mrt", MRTConfig)):
        with pytest.raises(UserError, match=f"trainer={rule} needs a per-output .* trainer=mgs"):
            build_rule(rule, cfg=OmegaConf.structured(schema()), model=model, tokenizer=None,
                       metric=CorpusOnly(), accelerator=Accelerator(cpu=True))


def test_lm_equals_a_direct_transformers_computation():
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=30, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=PAD,
                          eos_token_id=EOS, decoder_start_token_id=START, forced_eos_token_id=None,
                          max_position_embeddings=32)
    model = MarianMTModel(config).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD], [10, EOS, PAD, PAD]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])}
    rows = ROWS  # one output cut at the limit, one with EOS at the limit, one short
    d = decoded_batch(torch.tensor(rows), WordTokenizer(), [EOS], REFS, batch=batch)
    loss = LMScore("corpus")
    loss.bind(model, None)
    model.model.decoder.embed_tokens.weight.data.add_(1.0)  # the score model is a frozen copy from bind()
    expected_nll, expected_tokens = [], []
    reference = loss.model
    for i, row in enumerate(rows):
        targets = [t for t in row[1:]]
        if EOS in targets:
            targets = targets[:targets.index(EOS) + 1]  # through EOS
        logits = reference(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                           decoder_input_ids=torch.tensor([[START] + targets[:-1]])).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        expected_nll.append(-sum(log_probs[j, t].item() for j, t in enumerate(targets)))
        expected_tokens.append(len(targets))
    assert expected_tokens == [5, 5, 2]
    np.testing.assert_allclose(loss.stats(d), [sum(expected_nll), sum(expected_tokens)], rtol=1e-5)
    sentence = LMScore("sentence")
    sentence.model, sentence.eos = loss.model, loss.eos
    assert sentence.sentence_losses(d) == pytest.approx([n / t for n, t in zip(expected_nll, expected_tokens)],
                                                        rel=1e-5)
    # the frozen copy did not follow the live model, and takes no gradient
    assert not torch.equal(reference.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    assert not any(p.requires_grad for p in reference.parameters())

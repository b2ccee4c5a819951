"""Tests for mleps.metrics: agreement with sacrebleu, additivity of stats, edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from mleps.metrics import build_metric

# 20 hand-written (hypothesis, reference) pairs: exact, partial, reordered, short, empty-ish.
PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("a dog is running in the park", "the dog runs in the park"),
    ("we will meet tomorrow at noon", "let us meet tomorrow at noon"),
    ("the weather is nice today", "today the weather is lovely"),
    ("please send me the report by friday", "send the report to me by friday please"),
    ("he plays the guitar very well", "he is a very good guitar player"),
    ("the meeting has been cancelled", "the meeting was cancelled"),
    ("thanks", "thank you very much"),
    ("i do not know what to say", "i don't know what to say"),
    ("the train leaves at eight o'clock", "the train departs at 8 o'clock"),
    ("she bought three apples and a pear", "she bought a pear and three apples"),
    ("budget review for the third quarter", "q3 budget review"),
    ("the results are attached", "attached are the results"),
    ("can we reschedule our call", "could we move our call to another day"),
    ("new office opening in berlin", "opening of the new berlin office"),
    ("the server is down again", "the server went down again tonight"),
    ("happy birthday to you", "happy birthday"),
    ("invoice number 4521 is overdue", "invoice 4521 is overdue"),
    ("lunch on thursday", "lunch thursday?"),
    ("the project deadline moved to june", "project deadline is now june"),
]
HYPS = [h for h, _ in PAIRS]
REFS = [[r] for _, r in PAIRS]
STREAMS = [[r for _, r in PAIRS]]  # sacrebleu layout: one stream per reference slot


# ---------------------------------------------------------------- agreement with sacrebleu


def test_corpus_bleu_matches_sacrebleu_and_keeps_signature():
    m = build_metric("bleu", "corpus")
    out = m.corpus_score(HYPS, REFS)
    ref_metric = BLEU()
    expected = ref_metric.corpus_score(HYPS, STREAMS)
    assert out["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, STREAMS).score, abs=1e-9)
    assert out["bleu"] == out["score"] == pytest.approx(expected.score, abs=1e-9)
    assert out["signature"] == str(ref_metric.get_signature())
    assert "tok:13a" in out["signature"]
    assert out["bp"] == pytest.approx(expected.bp)
    assert out["precisions"] == pytest.approx(expected.precisions)
    assert (out["sys_len"], out["ref_len"]) == (expected.sys_len, expected.ref_len)
    assert m.score(HYPS, REFS) == pytest.approx(out["score"], abs=1e-9)


def test_corpus_chrf_matches_sacrebleu_and_keeps_signature():
    m = build_metric("chrf", "corpus")
    out = m.corpus_score(HYPS, REFS)
    ref_metric = CHRF()
    assert out["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, STREAMS).score, abs=1e-9)
    assert out["chrf"] == pytest.approx(ref_metric.corpus_score(HYPS, STREAMS).score, abs=1e-9)
    assert out["signature"] == str(ref_metric.get_signature())


def test_sentence_bleu_and_chrf_match_sacrebleu():
    bleu = build_metric("bleu", "sentence").sentence_scores(HYPS, REFS)
    chrf = build_metric("chrf", "sentence").sentence_scores(HYPS, REFS)
    for (h, r), b, c in zip(PAIRS, bleu, chrf):
        assert b == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score, abs=1e-9)
        assert c == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score, abs=1e-9)
    assert len(set(np.round(bleu, 6))) > 5  # smoothed: not all zero


def test_sentence_level_score_is_mean_of_sentence_scores():
    for name in ("bleu", "chrf", "rouge"):
        m = build_metric(name, "sentence")
        assert m.score(HYPS, REFS) == pytest.approx(np.mean(m.sentence_scores(HYPS, REFS)))


# ---------------------------------------------------------------- additivity of stats


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge"])
@pytest.mark.parametrize("level", ["corpus", "sentence"])
def test_stats_are_additive(name, level):
    m = build_metric(name, level)
    half = len(HYPS) // 2
    a = m.text_stats(HYPS[:half], REFS[:half])
    b = m.text_stats(HYPS[half:], REFS[half:])
    whole = m.score(HYPS, REFS)
    assert m.score_from_stats(a + b) == pytest.approx(whole, abs=1e-9)
    np.testing.assert_allclose(a + b, m.text_stats(HYPS, REFS))
    if level == "corpus":
        assert whole == pytest.approx(m.corpus_score(HYPS, REFS)["score"], abs=1e-9)
    # Halves differ from the whole, so the test is not vacuous.
    assert m.score_from_stats(a) != pytest.approx(whole)


def test_rouge_corpus_is_mean_of_sentence_scores():
    m = build_metric("rouge", "corpus")
    out = m.corpus_score(HYPS, REFS)
    assert out["score"] == out["rougeL"]
    assert out["rougeL"] == pytest.approx(np.mean(m.sentence_scores(HYPS, REFS)))
    assert 0 < out["rouge2"] < out["rouge1"] <= 100
    m1 = build_metric("rouge", "corpus", rouge_key="rouge1")
    assert m1.score(HYPS, REFS) == pytest.approx(out["rouge1"])


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge"])
@pytest.mark.parametrize("level", ["corpus", "sentence"])
def test_empty_inputs_score_zero(name, level):
    m = build_metric(name, level)
    assert m.score([""], [["the cat sat on the mat"]]) == 0.0
    assert m.score(["the cat sat on the mat"], [[""]]) == 0.0
    assert m.score(["the cat sat on the mat"], [[]]) == 0.0
    assert m.score([""], [[""]]) == 0.0
    assert m.score([], []) == 0.0
    assert m.corpus_score([], [])["score"] == 0.0
    assert m.sentence_scores([], []) == []
    assert m.sentence_scores([""], [["abc def"]]) == [0.0]
    assert m.score_from_stats(m.text_stats([], [])) == 0.0
    assert m.task_loss([], []) == 1.0


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge"])
def test_count_mismatch_raises(name):
    m = build_metric(name)
    with pytest.raises(ValueError, match=r"3 hypotheses but 2 reference"):
        m.score(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"1 hypotheses but 2 reference"):
        m.text_stats(["a"], [["a"], ["b"]])


def test_unknown_name_or_level_raises():
    with pytest.raises(ValueError, match="bleu, chrf, rouge"):
        build_metric("meteor")
    with pytest.raises(ValueError, match="corpus, sentence"):
        build_metric("bleu", level="document")
    with pytest.raises(ValueError, match="default, whitespace, char"):
        build_metric("rouge", tokenizer="spacy")
    with pytest.raises(ValueError, match="rouge1, rouge2, rougeL"):
        build_metric("rouge", rouge_key="rougeLsum")


def test_task_loss_is_one_minus_score():
    for name in ("bleu", "chrf", "rouge"):
        for level in ("corpus", "sentence"):
            m = build_metric(name, level)
            assert m.task_loss(HYPS, REFS) == pytest.approx(1 - m.score(HYPS, REFS) / 100)
            refs = [[r] for r in HYPS]
            assert m.score(HYPS, refs) == pytest.approx(100.0)
            assert m.task_loss(HYPS, refs) == pytest.approx(0.0, abs=1e-12)
            assert 0.0 <= m.task_loss(HYPS, refs) <= 1.0


# ---------------------------------------------------------------- multiple references


MULTI_HYPS = ["the budget meeting is moved to friday", "lunch with the team", "project kickoff notes"]
MULTI_REFS = [
    ["budget meeting rescheduled", "the budget meeting is moved to friday"],  # equal to 2nd ref
    ["team lunch"],  # a single reference
    ["kickoff notes", "notes from the project kickoff", "project kickoff", "kickoff meeting notes"],
]


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge"])
def test_hypothesis_equal_to_second_reference_scores_100(name):
    scores = build_metric(name, "sentence").sentence_scores(MULTI_HYPS[:1], MULTI_REFS[:1])
    assert scores[0] == pytest.approx(100.0)
    assert build_metric(name, "sentence").sentence_scores(MULTI_HYPS[:1], [MULTI_REFS[0][:1]])[0] < 100


def test_variable_reference_counts_at_corpus_level():
    # sacrebleu layout: one stream per reference slot, None where an example has fewer.
    streams = [[r[j] if j < len(r) else None for r in MULTI_REFS] for j in range(4)]
    bleu = build_metric("bleu").corpus_score(MULTI_HYPS, MULTI_REFS)
    assert bleu["score"] == pytest.approx(sacrebleu.corpus_bleu(MULTI_HYPS, streams).score, abs=1e-9)
    assert "nrefs:var" in bleu["signature"]
    chrf = build_metric("chrf").corpus_score(MULTI_HYPS, MULTI_REFS)
    assert chrf["score"] == pytest.approx(sacrebleu.corpus_chrf(MULTI_HYPS, streams).score, abs=1e-9)
    # Sentence level agrees with sacrebleu on each example's own reference list.
    sent = build_metric("bleu", "sentence").sentence_scores(MULTI_HYPS, MULTI_REFS)
    assert sent == pytest.approx([sacrebleu.sentence_bleu(h, r).score for h, r in zip(MULTI_HYPS, MULTI_REFS)])
    # More references can only help: adding references never lowers a sentence score.
    single = build_metric("bleu", "sentence").sentence_scores(MULTI_HYPS, [r[:1] for r in MULTI_REFS])
    assert all(s >= t for s, t in zip(sent, single))
    # Additivity holds with mixed reference counts too.
    for name in ("bleu", "chrf", "rouge"):
        m = build_metric(name)
        total = m.text_stats(MULTI_HYPS[:1], MULTI_REFS[:1]) + m.text_stats(MULTI_HYPS[1:], MULTI_REFS[1:])
        assert m.score_from_stats(total) == pytest.approx(m.score(MULTI_HYPS, MULTI_REFS))


def test_rouge_takes_best_reference_per_type():
    # Reference A wins on unigrams (same words, reversed), reference B on bigrams.
    hyp, ref_a, ref_b = "alpha beta gamma delta", "delta gamma beta alpha", "alpha beta kappa omega"
    out = build_metric("rouge", "corpus").corpus_score([hyp], [[ref_a, ref_b]])
    assert out["rouge1"] == pytest.approx(100.0)  # from A
    assert out["rouge2"] == pytest.approx(100 / 3)  # from B: 1 of 3 bigrams, A has none
    for key in ("rouge1", "rouge2", "rougeL"):
        m = build_metric("rouge", "sentence", rouge_key=key)
        each = [m.score([hyp], [[r]]) for r in (ref_a, ref_b)]
        assert m.score([hyp], [[ref_a, ref_b]]) == pytest.approx(max(each)) == pytest.approx(out[key])


def test_none_and_empty_references_are_padding():
    m = build_metric("bleu", "sentence")
    hyp = ["the cat sat on the mat"]
    assert m.sentence_scores(hyp, [[None, "", "the cat sat on the mat"]]) == pytest.approx([100.0])
    assert m.sentence_scores(hyp, ["the cat sat on the mat"]) == pytest.approx([100.0])  # bare string


# ---------------------------------------------------------------- ROUGE tokenisation


def test_rouge_uses_stemming():
    m = build_metric("rouge", "sentence", rouge_key="rouge1")
    assert m.sentence_scores(["running"], [["run"]]) == [pytest.approx(100.0)]
    assert m.sentence_scores(["the dogs were running"], [["the dog was run"]])[0] > 50
    no_stem = build_metric("rouge", "sentence", rouge_key="rouge1", use_stemmer=False)
    assert no_stem.sentence_scores(["running"], [["run"]]) == [0.0]


def test_rouge_tokenizer_option_for_chinese():
    zh = "我们明天在北京开会"
    assert build_metric("rouge").score([zh], [[zh]]) == 0.0  # default tokenizer drops non-Latin text
    assert build_metric("rouge", tokenizer="char").score([zh], [[zh]]) == pytest.approx(100.0)
    partial = build_metric("rouge", tokenizer="char").score(["我们明天开会"], [[zh]])
    assert 0 < partial < 100
    # Space-separated non-Latin scripts: whole words, punctuation dropped.
    ru = "встреча перенесена на пятницу."
    assert build_metric("rouge").score([ru], [[ru]]) == 0.0
    assert build_metric("rouge", tokenizer="whitespace").score([ru], [["встреча перенесена на пятницу"]]) == 100.0
    # whitespace tokenizer still stems English like the default.
    assert build_metric("rouge", tokenizer="whitespace").score(["running"], [["run"]]) == pytest.approx(100.0)


def test_rouge_accepts_tokenizer_object():
    class Split:
        def tokenize(self, text):
            return text.split("|")

    m = build_metric("rouge", tokenizer=Split(), rouge_key="rouge1")
    assert m.score(["a|b"], [["a|b"]]) == pytest.approx(100.0)


def test_chrf_rejects_tokenizer_and_bleu_accepts_sacrebleu_tokenizer():
    with pytest.raises(ValueError, match="chrF"):
        build_metric("chrf", tokenizer="char")
    zh_hyp, zh_ref = "我们明天开会", "我们明天在北京开会"
    out = build_metric("bleu", tokenizer="zh").corpus_score([zh_hyp], [[zh_ref]])
    assert out["score"] == pytest.approx(sacrebleu.corpus_bleu([zh_hyp], [[zh_ref]], tokenize="zh").score)
    assert "tok:zh" in out["signature"]
    with pytest.raises(ValueError, match="13a"):
        build_metric("bleu", tokenizer="nonsense")


def test_metric_attributes():
    m = build_metric("chrf", "sentence")
    assert (m.name, m.level) == ("chrf", "sentence")
    assert build_metric("BLEU").name == "bleu"

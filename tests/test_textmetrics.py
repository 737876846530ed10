"""Text metrics against hand-worked cases, float64 formulas, nltk's BLEU and the rouge-score package."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sefusion.tasks.textmetrics import (
    bleu4,
    bleu4_tokens,
    bleu_tokens,
    corpus_score,
    edit_similarity,
    exact_match,
    lcs_length,
    levenshtein,
    per_example,
    rouge_l,
)

WORD = st.sampled_from(["a", "b", "c", "d", "e", "f"])


def test_bleu_identical_is_one_and_hand_worked_cases():
    assert bleu4("Returns the cat.", "returns the cat .") == pytest.approx(1.0)
    # unigrams 3/4; 2-grams (2+1)/(3+1); 3-grams (1+1)/(2+1); 4-grams (0+1)/(1+1); equal lengths: no penalty
    want = (0.75 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert bleu4("a b c d", "a b c e") == pytest.approx(want, rel=1e-12)
    # every n-gram of the short hypothesis matches; brevity: exp(1 - (6 + 1) / (3 + 1))
    assert bleu4("a b c d e f", "a b c") == pytest.approx(math.exp(1 - 7 / 4), rel=1e-12)
    # an empty hypothesis: every precision is 0/0 -> 1 with CodeXGLUE's guards, brevity exp(-reflen)
    assert bleu4("a b", "") == pytest.approx(math.exp(-2), rel=1e-12)
    assert bleu4("a b c d", "x y z w") < 1e-70  # no unigram matches: log(0 + tiny)


def test_bleu_tokenization_is_codexglue_s():
    assert bleu_tokens("Get_Name(x) returns the user's ID.") == [
        "get", "_", "name", "(", "x", ")", "returns", "the", "user", "'", "s", "id", ".",
    ]  # fmt: skip
    # splitPuncts runs before normalize, so an entity is split before its unescaping could see it
    assert bleu_tokens("a&quot;b") == ["a", "&", "quot", ";", "b"]


@settings(max_examples=60, deadline=None)
@given(st.lists(WORD, min_size=4, max_size=12), st.lists(WORD, min_size=0, max_size=8))
def test_bleu_equals_nltk_method2_when_there_is_no_brevity_penalty(ref, extra):
    nltk = pytest.importorskip("nltk.translate.bleu_score")
    hyp = list(reversed(ref)) + extra  # at least as long as the reference: both penalties vanish
    if not set(hyp) & set(ref):
        return
    want = nltk.sentence_bleu([ref], hyp, smoothing_function=nltk.SmoothingFunction().method2)
    assert bleu4_tokens(ref, hyp) == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(WORD, min_size=1, max_size=10), st.lists(WORD, min_size=1, max_size=10))
def test_bleu_equals_a_float64_transcription_of_its_formula(ref, hyp):
    from collections import Counter

    logs = []
    for n in range(1, 5):
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        match = sum((h & r).values())
        guess = max(len(hyp) - n + 1, 0)
        add = 0 if n == 1 else 1
        logs.append(
            math.log(match + add + 2.2250738585072014e-308) - math.log(guess + add + 2.2250738585072014e-308)
        )
    want = math.exp(sum(logs) / 4 + min(0.0, 1 - (len(ref) + 1) / (len(hyp) + 1)))
    assert bleu4_tokens(ref, hyp) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert 0.0 <= bleu4_tokens(ref, hyp) <= 1.0 + 1e-12


def test_rouge_l_hand_worked():
    # LCS("a b c d", "a c e") = 2; P = 2/3, R = 2/4; F1 = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("The Cat", "the cat") == 1.0
    assert rouge_l("a b", "") == 0.0 and rouge_l("", "") == 0.0
    # beta weighs recall: F = (1 + b^2) P R / (R + b^2 P)
    assert rouge_l("a b c d", "a c e", beta=2) == pytest.approx(5 * (2 / 3) * 0.5 / (0.5 + 4 * (2 / 3)))


TEXT = st.lists(st.sampled_from(["get", "set", "the", "Name", "value,", "x.y", "of", "a"]), max_size=12)


@settings(max_examples=100, deadline=None)
@given(TEXT, TEXT)
def test_rouge_l_equals_rouge_score(ref, hyp):
    scorer_mod = pytest.importorskip("rouge_score.rouge_scorer")
    ref, hyp = " ".join(ref), " ".join(hyp)
    want = scorer_mod.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert rouge_l(ref, hyp) == pytest.approx(want, rel=1e-12, abs=1e-15)


def _lcs_full(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


@given(st.lists(WORD, max_size=12), st.lists(WORD, max_size=12))
def test_lcs_equals_the_full_table(a, b):
    assert lcs_length(a, b) == _lcs_full(a, b) == lcs_length(b, a)


def test_exact_match_ignores_whitespace_runs_only():
    assert exact_match("return  x\n", "  return x") == 1.0
    assert exact_match("return x", "return  x;") == 0.0
    assert exact_match("Return x", "return x") == 0.0


def test_edit_similarity_hand_worked():
    assert levenshtein("kitten", "sitting") == 3
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("a  b", "a b") == 1.0


def _lev_full(a, b):
    t = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = min(t[i - 1][j] + 1, t[i][j - 1] + 1, t[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return t[-1][-1]


SHORT = st.text(alphabet="abc x", max_size=10)


@given(SHORT, SHORT, SHORT)
def test_levenshtein_and_edit_similarity_invariants(a, b, c):
    assert levenshtein(a, b) == _lev_full(a, b) == levenshtein(b, a)
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)
    s = edit_similarity(a, b)
    assert 0.0 <= s <= 1.0 and s == edit_similarity(b, a)
    assert (s == 1.0) == (" ".join(a.split()) == " ".join(b.split()))
    assert exact_match(a, b) <= s


def test_per_example_and_corpus_score():
    refs, hyps = ["a b c d", "x"], ["a b c d", "y"]
    assert per_example("exact_match", refs, hyps) == [1.0, 0.0]
    assert corpus_score("bleu4", refs, hyps) == pytest.approx((1.0 + bleu4("x", "y")) / 2)
    with pytest.raises(KeyError, match="available"):
        per_example("bleu", refs, hyps)
    with pytest.raises(ValueError, match="1 hypotheses for 2"):
        per_example("rouge_l", refs, hyps[:1])

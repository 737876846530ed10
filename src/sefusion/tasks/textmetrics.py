"""Text metrics of the generative tasks, one score per example (for bootstrap intervals) and their mean.

- `bleu4`: smoothed sentence BLEU-4 as CodeXGLUE's code-to-text evaluator computes it (its `bleu.py`:
  `computeMaps` lower-cases and splits words from punctuation, `normalize` applies the NIST mteval
  tokenization, `score_cooked(smooth=1)` adds 1 to the matches and the candidates of 2-, 3- and 4-grams,
  the brevity penalty is min(0, 1 - (r + 1) / (c + 1)) in log space, r the shortest reference length),
  one score per example in [0, 1]; CodeXGLUE reports 100 x their mean (`bleuFromMaps`).
- `rouge_l`: ROUGE-L F-measure from the longest common subsequence of tokens, beta = 1 by default (the
  F1 that the `rouge-score` package reports), tokenized like `rouge-score` without stemming.
- `exact_match`: 1 when both texts are equal after every run of whitespace becomes one space and the
  ends are stripped (so indentation and line breaks do not count), else 0.
- `edit_similarity`: 1 - Levenshtein(a, b) / max(len(a), len(b)) over characters of the same
  whitespace-normalized texts (1 for two empty texts).
"""

from __future__ import annotations

import math
import re
import sys
import xml.sax.saxutils
from collections import Counter
from collections.abc import Callable, Sequence

_TINY = sys.float_info.min  # CodeXGLUE's guard against log(0)

# NIST mteval-v11a tokenization, as CodeXGLUE's bleu.py applies it.
_NORM1 = [(re.compile(p), r) for p, r in (("<skipped>", ""), (r"-\n", ""), (r"\n", " "))]
_NORM2 = [
    (re.compile(p), r)
    for p, r in (
        (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),  # punctuation (not the apostrophe)
        (r"([^0-9])([\.,])", r"\1 \2 "),  # period and comma unless preceded by a digit
        (r"([\.,])([^0-9])", r" \1 \2"),  # period and comma unless followed by a digit
        (r"([0-9])(-)", r"\1 \2 "),  # dash after a digit
    )
]


def bleu_tokens(text: str) -> list[str]:
    """CodeXGLUE's tokens of one text: `splitPuncts(text.strip().lower())`, then `normalize`."""
    s = " ".join(re.findall(r"[\w]+|[^\s\w]", text.strip().lower()))
    for pattern, repl in _NORM1:
        s = pattern.sub(repl, s)
    s = xml.sax.saxutils.unescape(s, {"&quot;": '"'})
    s = f" {s} ".lower()
    for pattern, repl in _NORM2:
        s = pattern.sub(repl, s)
    return s.split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4_tokens(reference: Sequence[str], hypothesis: Sequence[str], n: int = 4) -> float:
    """Smoothed sentence BLEU of token lists (one reference), CodeXGLUE's `score_cooked(smooth=1)`."""
    log_bleu = 0.0
    for k in range(1, n + 1):
        ref, hyp = _ngrams(reference, k), _ngrams(hypothesis, k)
        correct = sum(min(c, ref[g]) for g, c in hyp.items())
        guess = max(len(hypothesis) - k + 1, 0)
        add = 1 if k > 1 else 0
        log_bleu += math.log(correct + add + _TINY) - math.log(guess + add + _TINY)
    brevity = min(0.0, 1 - (len(reference) + 1) / (len(hypothesis) + 1))
    return math.exp(log_bleu / n + brevity)


def bleu4(reference: str, hypothesis: str) -> float:
    """CodeXGLUE smoothed BLEU-4 of one hypothesis against one reference, in [0, 1]."""
    return bleu4_tokens(bleu_tokens(reference), bleu_tokens(hypothesis))


def rouge_tokens(text: str) -> list[str]:
    """`rouge-score`'s default tokens: lower case, runs of anything but [a-z0-9] are separators."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


def rouge_l(reference: str, hypothesis: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure: (1 + b^2) P R / (R + b^2 P), P = LCS / |hyp|, R = LCS / |ref|; 0 when either
    side has no token (as `rouge-score` does)."""
    ref, hyp = rouge_tokens(reference), rouge_tokens(hypothesis)
    if not ref or not hyp:
        return 0.0
    lcs = lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def normalize_ws(text: str) -> str:
    """Every run of whitespace -> one space, ends stripped."""
    return " ".join(text.split())


def exact_match(reference: str, hypothesis: str) -> float:
    return float(normalize_ws(reference) == normalize_ws(hypothesis))


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions (each 1) that turn a into b."""
    if len(b) > len(a):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
            prev = cur
    return row[-1]


def edit_similarity(reference: str, hypothesis: str) -> float:
    a, b = normalize_ws(reference), normalize_ws(hypothesis)
    if not a and not b:
        return 1.0
    return 1 - levenshtein(a, b) / max(len(a), len(b))


METRICS: dict[str, Callable[[str, str], float]] = {
    "bleu4": bleu4,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "edit_similarity": edit_similarity,
}


def per_example(metric: str, references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """`metric`'s score of each (reference, hypothesis) pair, in order."""
    if metric not in METRICS:
        raise KeyError(f"unknown text metric {metric!r}; available: {', '.join(METRICS)}")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    fn = METRICS[metric]
    return [fn(r, h) for r, h in zip(references, hypotheses, strict=True)]


def corpus_score(metric: str, references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """The mean of the per-example scores (CodeXGLUE's BLEU is 100 times this for `bleu4`)."""
    scores = per_example(metric, references, hypotheses)
    if not scores:
        raise ValueError("no examples to score")
    return math.fsum(scores) / len(scores)

"""No-training baselines against independent references: TF-IDF by hand (plain Python, float64), name
match by hand, majority class; scored by the task layer's metric."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from sefusion.tasks.base import Example, TaskData, get_task, mrr
from sefusion.tasks.baselines import (
    majority_class,
    name_match,
    no_training_baseline,
    search_baseline,
    tfidf_similarity,
    words,
)


def _reference_tfidf(queries, docs):
    """Plain-Python TF-IDF cosine (smoothed IDF on the documents)."""
    toks = [words(d) for d in docs]
    vocab = sorted({w for t in toks for w in t})
    df = {w: sum(w in t for t in toks) for w in vocab}
    idf = {w: math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in vocab}

    def vec(ws):
        c = Counter(w for w in ws if w in idf)
        v = {w: n * idf[w] for w, n in c.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    dv = [vec(t) for t in toks]
    return [[sum(x * d.get(w, 0.0) for w, x in vec(words(q)).items()) for d in dv] for q in queries]


def test_words_split_identifiers():
    assert words("os.ReadFile(name_v2)") == ["os", "read", "file", "name", "v", "2"]


def test_tfidf_matches_a_plain_reference():
    docs = ["func readFile(path string) error", "def write_file(path, data): pass", "x = parseJSON(raw)"]
    queries = ["read the file at path", "parse json text", "nothing matches here", "write data to a file"]
    got = tfidf_similarity(queries, docs)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, _reference_tfidf(queries, docs), rtol=1e-12, atol=1e-15)
    assert np.all(got[2] == 0)
    assert tfidf_similarity(["file"], ["file"])[0, 0] == pytest.approx(1.0)


def test_name_match_by_hand():
    m = name_match(["ReadFile reads a file", "reads it (readfile)", "readFiles"], ["readFile", "Close", ""])
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]


def _pool(queries, codes, names):
    return [
        Example(q, c, i, {"function": n})
        for i, (q, c, n) in enumerate(zip(queries, codes, names, strict=True))
    ]


def test_search_baseline_name_match_ranks_first():
    codes = ["func Open(p string) {}", "func Close() {}", "func Read(b []byte) {}"]
    names = ["Open", "Close", "Read"]
    pool = _pool(["Open opens it.", "Close closes it.", "Read reads bytes."], codes, names)
    assert mrr(search_baseline(pool), [0, 1, 2]) == 1.0
    spec, _ = get_task("search-go")
    data = TaskData("search-go", {"train": [], "validation": [], "test": pool}, {})
    res = no_training_baseline(data, spec)
    assert (
        res["baseline"] == "name match + TF-IDF" and res["score"] == 1.0 and res["per_example"] == [1, 1, 1]
    )
    # masked queries and no shared words: every candidate ties at 0, each gold ranks last (ties count against)
    blind = _pool(["opens it.", "closes it.", "gets bytes."], codes, names)
    assert mrr(search_baseline(blind), [0, 1, 2]) == pytest.approx(1 / 3)


def test_majority_class_baseline():
    train = [Example("a", label=y) for y in (0, 1, 1, 2, 2)]  # tie 1/2: the smaller label
    assert majority_class(train) == 1
    test = [Example("t", label=y) for y in (1, 0, 1, 2)]
    spec, _ = get_task("naming-python")
    res = no_training_baseline(TaskData("naming-python", {"train": train, "test": test}, {}), spec)
    assert res["baseline"] == "majority class" and res["score"] == 0.5 and res["per_example"] == [1, 0, 1, 0]

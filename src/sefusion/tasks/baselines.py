"""No-training baselines: what a task's test split gives away without any model.

* retrieval (`search`): **name match + TF-IDF**. A candidate scores 1 when its function's name appears
  in the query as a whole word (any case), plus the cosine similarity of TF-IDF vectors of query and
  code (in [0, 1], so it orders the candidates within each name-match group). Words are identifier words
  (`readFile` -> `read`, `file`), lower-cased; the IDF is fitted on the pool's code, smoothed
  (log((1 + N) / (1 + df)) + 1), vectors L2-normalized. No labels are used.
* classification: **majority class**: every test example gets the train split's most frequent label.

Both are scored by the task layer's `score`, so a baseline and a model share one metric (ties against
the query for MRR). A model that does not beat its task's baseline has learnt nothing the data did not
already give away.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Example, TaskData, TaskError, TaskSpec, score
from .search import identifier_words

_TOKEN = re.compile(r"[A-Za-z_$][\w$]*|\d+")


def words(text: str) -> list[str]:
    """The identifier words of a text, lower-cased (`os.ReadFile(name)` -> os, read, file, name)."""
    return [w for tok in _TOKEN.findall(text) for w in identifier_words(tok)]


def tfidf_similarity(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """(Q, D) cosine similarity of TF-IDF vectors, the IDF fitted on `documents` (query words the
    documents never use are dropped)."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    doc_words = [words(d) for d in documents]
    for ws in doc_words:
        for w in ws:
            vocab.setdefault(w, len(vocab))

    def counts(texts: list[list[str]]) -> Any:
        rows, cols = [], []
        for i, ws in enumerate(texts):
            for w in ws:
                if w in vocab:
                    rows.append(i)
                    cols.append(vocab[w])
        data = np.ones(len(rows))
        return sparse.csr_matrix((data, (rows, cols)), shape=(len(texts), max(len(vocab), 1)))

    d = counts(doc_words)
    df = np.asarray((d > 0).sum(axis=0)).ravel()
    idf = np.log((1 + len(documents)) / (1 + df)) + 1
    q = counts([words(t) for t in queries])

    def normalized(m: Any) -> Any:
        m = m.multiply(idf[None, :]).tocsr()
        norm = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
        return sparse.diags(1 / np.where(norm > 0, norm, 1)) @ m

    return np.asarray((normalized(q) @ normalized(d).T).todense())


def name_match(queries: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """(Q, D) 1 where candidate j's function name occurs in query i as a whole word (any case), else 0."""
    lowered = [q.lower() for q in queries]
    out = np.zeros((len(queries), len(names)))
    for j, name in enumerate(names):
        if not name:
            continue
        pat = re.compile(r"(?<![\w$])" + re.escape(name.lower()) + r"(?![\w$])")
        for i, q in enumerate(lowered):
            if name.lower() in q and pat.search(q):
                out[i, j] = 1.0
    return out


def search_baseline(examples: Sequence[Example]) -> np.ndarray:
    """(Q, P) name match + TF-IDF similarity of each query (text) to each candidate (text_pair)."""
    codes = [str(ex.text_pair) for ex in examples]
    queries = [ex.text for ex in examples]
    names = [str((ex.meta or {}).get("function") or "") for ex in examples]
    return name_match(queries, names) + tfidf_similarity(queries, codes)


def majority_class(train: Sequence[Example]) -> int:
    """The most frequent train label (ties: the smallest label)."""
    if not train:
        raise TaskError("majority class: the train split is empty")
    counts = Counter(ex.label for ex in train)
    return min(counts, key=lambda y: (-counts[y], y))


def no_training_baseline(data: TaskData, spec: TaskSpec, split: str = "test") -> dict[str, Any]:
    """The task's no-training baseline on `split`: {"baseline", "score", "n", "per_example"}."""
    examples = list(data.splits.get(split) or [])
    if not examples:
        raise TaskError(f"task '{data.task}' has no examples in split '{split}'")
    if spec.metric == "mrr":
        name, pred = "name match + TF-IDF", search_baseline(examples)
    else:
        name, pred = "majority class", [majority_class(data.splits.get("train") or [])] * len(examples)
    res = score(spec, pred, examples)
    return {"baseline": name, "score": float(res["score"]), "n": int(res["n"]),
            "per_example": res["per_example"]}  # fmt: skip


__all__ = ["majority_class", "name_match", "no_training_baseline", "search_baseline", "tfidf_similarity",
           "words"]  # fmt: skip

"""Per-example score storage (exact round trips), gain kept and failure flags read from results, and the
interval readings of a study's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sefusion.study import gains, scores
from sefusion.study import uncertainty as U
from sefusion.study.report import summary_markdown


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=300))
def test_bits_round_trip(bits):
    enc = scores.encode_scores(bits)
    assert "bits" in enc and len(enc["bits"]) <= 4 * ((len(bits) + 7) // 8 + 2) // 3 + 4
    assert scores.decode_scores(json.loads(json.dumps(enc))).tolist() == [float(b) for b in bits]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 70000), min_size=1, max_size=200))
def test_reciprocal_ranks_round_trip_exactly(ranks):
    rr = [1.0 / r for r in ranks]
    enc = scores.encode_scores(rr)
    if max(ranks) > 1:  # all first: stored as bits
        assert "ranks" in enc and enc["dtype"] == ("<u2" if max(ranks) < 65536 else "<u4")
    assert scores.decode_scores(enc).tolist() == rr


def test_other_scores_and_clusters_round_trip():
    x = [0.25, 0.3, 1.0]  # 0.3 is no reciprocal rank
    assert "f8" in scores.encode_scores(x) and scores.decode_scores(scores.encode_scores(x)).tolist() == x
    paths = ["a.py", "b.py", "a.py", "c.py"]
    enc = scores.encode_clusters(paths)
    assert enc["files"] == ["a.py", "b.py", "c.py"] and scores.decode_clusters(enc) == paths
    with pytest.raises(U.UncertaintyError, match="header says 5"):
        scores.decode_scores({**scores.encode_scores(x), "n": 5})


def test_scores_document():
    doc = scores.scores_document(
        {"t": {"clusters": ["a", "a", "b"], "fingerprint": "f"}},
        {"individual": {"t": [1, 1, 0]}, "ties": {"t": [1, 0, 0]}},
    )
    clusters, rows = scores.read_scores_document(json.loads(json.dumps(doc)))
    assert clusters == {"t": ["a", "a", "b"]} and rows["ties"]["t"].tolist() == [1, 0, 0]
    with pytest.raises(U.UncertaintyError, match="row 'ties': 2 scores for task 't', which has 3"):
        scores.scores_document({"t": {"clusters": ["a", "a", "b"]}}, {"ties": {"t": [1, 0]}})


def _results():
    rows = [
        {"method": "pretrained", "test": {"a": 0.50, "b": 0.40}},
        {"method": "individual", "test": {"a": 0.90, "b": 0.80}},
        {"method": "ties", "test": {"a": 0.70, "b": 0.30}},
        {"method": "tall", "test": {"a": 0.90, "b": 0.20}},
    ]
    experts = {"a": {"test": 0.90, "chance": 0.5}, "b": {"test": 0.80, "chance": 0.25}}
    for r in rows:
        r["normalized"] = {t: v / experts[t]["test"] for t, v in r["test"].items()}
        r["avg_normalized"] = sum(r["normalized"].values()) / 2
    return {"scenario": "s", "rows": rows, "experts": experts}


def test_gain_kept_and_flags_by_hand():
    r = gains.row_readings(_results())
    assert set(r) == {"ties", "tall"}
    assert r["ties"]["a"]["gain_kept"] == pytest.approx(0.5)  # (0.7-0.5)/(0.9-0.5)
    assert r["ties"]["b"]["gain_kept"] == pytest.approx(-0.25)  # (0.3-0.4)/(0.8-0.4)
    assert r["ties"]["b"]["flags"] == [gains.BELOW_PRETRAINED]
    assert r["tall"]["b"]["flags"] == [gains.BELOW_PRETRAINED, gains.BELOW_CHANCE]
    assert r["tall"]["a"]["flags"] == []
    s = gains.row_summary(r["tall"])
    assert s == {"avg_gain_kept": pytest.approx(0.25), "worst_gain_kept": pytest.approx(-0.5),
                 "below_pretrained": 1, "below_chance": 1, "tasks": 2}  # fmt: skip
    assert gains.gain_kept(0.7, 0.5, 0.5) is None  # no gain to keep


def test_summary_has_gain_columns():
    out = summary_markdown([_results(), _results()])
    line = next(x for x in out.splitlines() if x.startswith("| tall |") and "(" in x)
    assert line == "| tall | 0.250 (-0.500) | 1/2, 1/2 | 0.250 (-0.500) | 1/2, 1/2 |"


def test_summary_reads_only_tasks_with_a_normalized_score():
    """A task whose expert scores 0 has no normalized score (NaN): the worst task and the degraded count
    are over the other tasks."""
    res = _results()
    for r in res["rows"]:
        r["normalized"]["a"] = float("nan")
        r["avg_normalized"] = r["normalized"]["b"]
    out = summary_markdown([res]).splitlines()
    assert "| ties | 0.375 | 0.375 |" in out  # 0.30 / 0.80, task b
    assert "| ties | 1/1 |" in out and "| individual | 0/1 |" in out


def test_task_intervals_from_per_example_scores():
    rng = np.random.default_rng(0)
    n = 200
    expert = (rng.random(n) < 0.9).astype(float)
    pre = (rng.random(n) < 0.5).astype(float)
    bad = np.zeros(n)  # far below pretrained
    files = [f"f{i // 5}.py" for i in range(n)]
    out = gains.task_intervals(
        {"t": files},
        {"individual": {"t": expert}, "pretrained": {"t": pre}, "bad": {"t": bad}},
        [("bad", "individual")],
    )["t"]
    cell = out["rows"]["bad"]
    assert cell["below_pretrained_significant"] is True
    assert cell["normalized"]["estimate"] == 0.0
    g = U.gain_kept(bad, expert, pre, files)
    assert cell["gain_kept"] == g.as_dict() and g.high < 0
    assert out["differences"]["bad - individual"]["significant"] is True
    assert out["rows"]["individual"]["interval"] == U.interval(expert, files).as_dict()


def test_task_facts():
    from sefusion.tasks.base import Example, TaskData, data_fingerprint, get_task

    train = [Example("a", label=y) for y in (1, 1, 0)]
    test = [Example("t", label=y, meta={"path": f"f{i % 2}.py"}) for i, y in enumerate((1, 0, 1, 1))]
    data = TaskData("naming-python", {"train": train, "validation": [], "test": test}, {}, ["a", "b"])
    spec, _ = get_task("naming-python")
    facts = gains.task_facts(data, spec, b=500)
    assert facts["fingerprint"] == data_fingerprint(data) and len(facts["fingerprint"]) == 64
    assert facts["test_examples"] == 4 and facts["test_files"] == 2
    base = facts["baseline"]
    assert base["name"] == "majority class" and base["estimate"] == 0.75
    # two files: f0 holds labels (1, 1), f1 holds (0, 1): resample means 1, 0.75 or 0.5
    assert (base["low"], base["high"]) == (0.5, 1.0)

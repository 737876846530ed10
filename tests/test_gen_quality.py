"""Quality of generated code: parse check and ruff findings per category, counted by hand on small cases;
their bootstrap intervals against quality_table run on every resample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sefusion.gen.quality import Analysis, analyze, category, parses, quality_table
from sefusion.study import gen_quality as Q
from sefusion.study import uncertainty as U

PROMPT = "import os\n\n\ndef f(a):\n    '''Doc.'''\n"  # `os` unused: the prompt's, not the model's


def test_parses() -> None:
    assert parses("def f():\n    return 1\n")
    assert not parses("def f(:\n")
    assert not parses("def f():\nreturn 1\n")
    assert parses("x = '\\d'\n")  # an invalid escape only warns: still Python
    assert not parses("x = 1\x00\n")


@pytest.mark.parametrize(
    ("code", "expected"),
    [("F401", "F"), ("E741", "E"), ("C901", "C90"), ("PLR0912", "PLR"), ("SIM108", "SIM"), ("RET504", "RET")],
)
def test_category(code: str, expected: str) -> None:
    assert category(code) == expected


def test_only_the_generated_lines_count() -> None:
    codes = [
        "    return a\n",  # clean
        "    if a == True:\n        return 1\n    else:\n        return 2\n",  # E712, RET505
        "    l = [x for x in range(a)]\n    return l\n",  # E741, C416 not selected, RET504
        "    return (\n",  # does not parse
    ]
    analyses = analyze(codes, [PROMPT] * 4)
    assert [a.parses for a in analyses] == [True, True, True, False]
    assert analyses[0].findings == {}  # F401 of the prompt's import is not the model's
    assert analyses[1].findings == {"E712": 1, "RET505": 1}
    assert analyses[2].findings == {"E741": 1, "RET504": 1}
    table = quality_table(analyses)
    assert table["functions"] == 4 and table["parsed"] == 3 and table["parse_rate"] == 0.75
    assert table["findings_per_100"] == {"E": round(200 / 3, 2), "RET": round(200 / 3, 2)}
    assert table["findings_total_per_100"] == round(400 / 3, 2)


def test_whole_functions_without_prompts_and_empty_input() -> None:
    table = quality_table(["import os\n\n\ndef g():\n    return 1\n"])
    assert table["findings_per_100"] == {"F": 100.0} and table["parse_rate"] == 1.0
    assert quality_table([Analysis(False)]) == {
        "functions": 1, "parsed": 0, "parse_rate": 0.0, "findings_per_100": {}, "findings_total_per_100": 0.0,
    }  # fmt: skip
    assert analyze([]) == []


# ------------------------------------------------- intervals of the quality measures (study.gen_quality)

analysis_st = st.builds(
    Analysis,
    st.booleans(),
    st.dictionaries(st.sampled_from(["F401", "E501", "B006"]), st.integers(1, 3), max_size=2),
).map(lambda a: a if a.parses else Analysis(False))  # ruff reads only what parses
analyses_st = st.lists(analysis_st, min_size=1, max_size=12)


def _measures(sample: list[Analysis]) -> tuple[float, float]:
    q = quality_table(sample)
    return q["parse_rate"], q["findings_total_per_100"] if q["parsed"] else math.nan


def _reference(
    analyses: list[Analysis], clusters: list[str] | None, b: int, other: list[Analysis] | None = None
) -> dict[str, np.ndarray]:
    """Each resample's measures (or, with `other`, their differences on the same resample) from
    quality_table itself, on the resampled replies: a slow loop."""
    w = U.resample_weights(len(analyses), clusters, b=b)
    reps: dict[str, list[float]] = {"parse_rate": [], "findings_total_per_100": []}
    for row in w:
        rate, per_100 = _measures([a for a, k in zip(analyses, row, strict=True) for _ in range(k)])
        if other is not None:
            rate_o, per_100_o = _measures([a for a, k in zip(other, row, strict=True) for _ in range(k)])
            rate, per_100 = rate - rate_o, per_100 - per_100_o
        reps["parse_rate"].append(rate)
        reps["findings_total_per_100"].append(per_100)
    return {k: np.array(v) for k, v in reps.items()}


@settings(max_examples=40, deadline=None)
@given(analyses_st, st.booleans())
def test_quality_intervals_are_quality_table_on_every_resample(
    analyses: list[Analysis], by_file: bool
) -> None:
    clusters = [f"f{i % 3}.py" for i in range(len(analyses))] if by_file else None
    got = Q.intervals(analyses, clusters, b=60)
    table = quality_table(analyses)
    reps = _reference(analyses, clusters, 60)
    for key in ("parse_rate", "findings_total_per_100"):
        iv = got[key]
        if table["parsed"] or key == "parse_rate":
            assert iv["estimate"] == pytest.approx(table[key], abs=0.006)  # the table rounds per 100 to 0.01
        if key != "parse_rate" and (np.isnan(reps[key]).any() or not table["parsed"]):
            assert iv["low"] is None and iv["high"] is None
        else:
            low, high = np.percentile(reps[key], [2.5, 97.5])
            assert (iv["low"], iv["high"]) == pytest.approx((low, high), abs=0.006)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_quality_differences_are_quality_table_differences_on_the_same_resamples(data: st.DataObject) -> None:
    a = data.draw(analyses_st)
    other = data.draw(st.lists(analysis_st, min_size=len(a), max_size=len(a)))
    got = Q.difference(a, other, b=60)
    reps = _reference(a, None, 60, other)
    for key in ("parse_rate", "findings_total_per_100"):
        if np.isnan(reps[key]).any():
            assert got[key]["low"] is None and not got[key]["significant"]
        else:
            low, high = np.percentile(reps[key], [2.5, 97.5])
            assert (got[key]["low"], got[key]["high"]) == pytest.approx((low, high), abs=0.006)
            assert got[key]["significant"] == (low > 0 or high < 0)


def test_undefined_findings_render_as_a_dash_before_and_after_writing() -> None:
    """No parsed function: findings per 100 is undefined (NaN in memory, null in results.json): '–'."""
    from sefusion.study.gen_report import _clean, _difference, _quality_cell

    broken, fine = [Analysis(False)] * 3, [Analysis(True, {"F401": 1})] * 3
    q = {"parse_rate": 0.0, "findings_total_per_100": 0.0, "intervals": Q.intervals(broken)}
    d = Q.difference(broken, fine)["findings_total_per_100"]
    for cell, diff in ((q, d), (_clean(q), _clean(d))):
        assert _quality_cell(cell) == "0.000 [0.000, 0.000] / –"
        assert _difference(diff, 1) == "–"


def test_quality_differences_by_hand() -> None:
    ok = [Analysis(True, {"F401": 2}), Analysis(True), Analysis(True, {"E501": 1}), Analysis(True)]
    broken = [Analysis(False)] * 4
    same = Q.difference(ok, ok)
    assert same["parse_rate"] == {**same["parse_rate"], "estimate": 0.0, "low": 0.0, "high": 0.0}
    assert not same["parse_rate"]["significant"] and not same["findings_total_per_100"]["significant"]
    d = Q.difference(ok, broken)
    assert (d["parse_rate"]["estimate"], d["parse_rate"]["low"], d["parse_rate"]["high"]) == (1.0, 1.0, 1.0)
    assert d["parse_rate"]["significant"]
    # nothing of `broken` parses: its findings per 100 parsed functions, and so the difference, is undefined
    assert d["findings_total_per_100"]["low"] is None and not d["findings_total_per_100"]["significant"]
    fewer = [Analysis(True)] * 4
    d = Q.difference(ok, fewer)  # 3 findings in 4 functions against none: 75 per 100
    assert d["findings_total_per_100"]["estimate"] == pytest.approx(75.0)
    assert d["findings_total_per_100"]["low"] >= 0.0
    with pytest.raises(U.UncertaintyError, match="4 and 3"):
        Q.difference(ok, fewer[:3])


def test_one_file_is_one_draw() -> None:
    """Replies of one source file are drawn together: a single file gives every resample the same value."""
    analyses = [Analysis(True, {"F401": 1}), Analysis(False), Analysis(True)]
    got = Q.intervals(analyses, ["a.py"] * 3)
    assert got["parse_rate"]["low"] == got["parse_rate"]["high"] == pytest.approx(2 / 3)
    assert (
        got["findings_total_per_100"]["low"] == got["findings_total_per_100"]["high"] == pytest.approx(50.0)
    )


def test_code_in_another_language_gets_a_parse_rate_and_no_findings() -> None:
    """A JavaScript repair reply is not read as Python: tree-sitter says whether it parses, and ruff's
    findings are not measured (None), shown as a dash with no interval; Python replies keep theirs."""
    from sefusion.tasks.generative import GenExample

    js = [
        "function f(a) {\n  return a + 1;\n}",
        "function f(a) {\n  return a +;\n}",
        "```js\nconst g = (x) => x;\n```",
    ]
    examples = [GenExample("fix", "", {"file": f"f{i}.js", "language": "javascript"}) for i in range(3)]
    recs = [{"index": i, "reply": r, "file": f"f{i}.js"} for i, r in enumerate(js)]
    analyses = Q.task_analyses(examples, "repair", recs)
    assert [a.parses for a in analyses] == [True, False, True]
    assert all(a.findings is None for a in analyses)
    table = quality_table(analyses)
    assert table["parse_rate"] == pytest.approx(2 / 3) and table["findings_total_per_100"] is None
    iv = Q.intervals(analyses, Q.task_clusters(recs), b=200)
    assert iv["parse_rate"]["low"] is not None and iv["findings_total_per_100"]["low"] is None
    assert math.isnan(iv["findings_total_per_100"]["estimate"])
    py = [GenExample("fix", "", {"file": "a.py", "language": "python"})]
    (one,) = Q.task_analyses(py, "repair", [{"index": 0, "reply": "def f(l):\n    return l", "file": "a.py"}])
    assert one.parses and one.findings == {"E741": 1}

"""Quality of generated code: parse check and ruff findings per category, counted by hand on small cases."""

from __future__ import annotations

import pytest

from sefusion.gen.quality import Analysis, analyze, category, parses, quality_table

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

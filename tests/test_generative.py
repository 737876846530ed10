"""Generative tasks (`KIND-LANG` for causal LMs) on the synthetic six-language corpus of test_tasks and on
a small Python tree whose doctests are executed (by a plain subprocess standing in for the sandbox)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from sefusion.tasks.base import TaskError, build_task, get_task
from sefusion.tasks.corpus import from_tree
from sefusion.tasks.corpus_extract import LANGUAGES
from sefusion.tasks.generative import (
    build_generative,
    build_generative_from,
    build_translate,
    generate_example,
    generated_function,
    generative_task_names,
    get_generative,
    parses,
    per_example_scores,
    score_generative,
)
from test_tasks import ALL, SMALL


def build(name: str, **kw):
    spec, lang = get_generative(name)
    from sefusion.tasks.generative import GenSplits

    return GenSplits.of(spec.build_from(ALL, lang, sizes=kw.pop("sizes", SMALL), **kw))


def test_names_resolve_and_each_registry_refuses_the_other():
    names = generative_task_names()
    for lang in LANGUAGES:
        for kind in ("summarize", "repair", "complete"):
            assert f"{kind}-{lang}" in names
    assert "generate-python" in names and "generate-go" not in names
    assert get_generative("summarize-js")[1] == "javascript"
    with pytest.raises(TaskError, match="generative task"):
        get_task("summarize-go")  # the encoder study, recipes' `data:`, statistics all go through here
    with pytest.raises(TaskError, match="generative task"):
        build_task("generate-python")
    with pytest.raises(TaskError, match="encoder task"):
        get_generative("defect-python")
    with pytest.raises(TaskError, match="unknown generative task .generate-go.; available: summarize-go"):
        get_generative("generate-go")


def test_encoder_study_refuses_a_generative_task_in_one_line(tmp_path, capsys):
    from sefusion.cli import main

    scenario = tmp_path / "sc.yaml"
    scenario.write_text("tasks: [summarize-go, naming-python]\n")
    code = main(["study", str(scenario), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "task 'summarize-go' is a generative task" in err


@pytest.mark.parametrize("kind", ["summarize", "repair", "complete"])
@pytest.mark.parametrize("lang", LANGUAGES)
def test_builders_split_by_file_deterministically(kind, lang):
    a, b = build(f"{kind}-{lang}"), build(f"{kind}-{lang}")
    assert a.fingerprint == b.fingerprint and a.train == b.train
    assert a.fingerprint != build(f"{kind}-{lang}", seed=1).fingerprint
    files = {s: {ex.meta["file"] for ex in a.split(s)} for s in ("train", "validation", "test")}
    assert not files["train"] & files["test"] and not files["validation"] & files["test"]
    assert a.train and a.test
    for ex in a.train + a.test:
        assert f"```{lang}\n" in ex.prompt and ex.target and ex.meta["language"] == lang
        assert len(ex.prompt) <= 1500 and len(ex.target) <= 768


@pytest.mark.parametrize("kind", ["summarize", "repair", "complete", "generate"])
def test_no_target_holds_a_stop_string(kind):
    from sefusion.tasks.generative import STOP_STRINGS

    for lang in ["python"] if kind == "generate" else LANGUAGES:
        data = build(f"{kind}-{lang}")
        for ex in data.train + data.test:
            assert not any(stop in ex.target for stop in STOP_STRINGS[kind]), ex.target


def test_summarize_target_is_the_first_doc_sentence_and_not_in_the_prompt():
    data = build("summarize-python")
    for ex in data.test:
        assert ex.prompt.startswith("Summarize this Python function in one sentence:")
        assert ex.target.endswith(".") and ex.target not in ex.prompt


def test_repair_prompt_holds_the_mutant_and_target_the_original():
    data = build("repair-python")
    by_code = {f.code for f in ALL["python"]}
    kinds = set()
    for ex in data.train:
        assert ex.target in by_code and f"```python\n{ex.target}\n```" not in ex.prompt
        assert ex.meta["before"] in ex.target
        kinds.add(ex.meta["kind"])
        assert parses(ex.target, "python")
    assert len(kinds) >= 3


def test_complete_target_is_the_line_after_the_prompt():
    data = build("complete-go")
    code = {(f.path, f.name): f.code for f in ALL["go"]}
    for ex in data.test:
        lines = code[(ex.meta["file"], ex.meta["function"])].split("\n")
        i = ex.meta["line"]
        assert ex.target == lines[i].strip() and ex.prompt.endswith("\n".join(lines[:i]) + "\n```")


def test_lengths_are_bounded_by_dropping_long_functions():
    small = build("summarize-python", options={"max_prompt_chars": 200})
    full = build("summarize-python")
    assert all(len(ex.prompt) <= 200 for ex in small.train + small.test)
    assert any(len(ex.prompt) > 200 for ex in full.train + full.test)


def test_generate_task_on_the_synthetic_corpus():
    data = build("generate-python")
    assert data.train and data.test
    for ex in data.test:
        assert ex.prompt.startswith("Complete this Python function.") and ex.target.startswith("    ")
        assert ex.target not in ex.prompt and parses(generated_function(ex, ex.target), "python")
    assert data.provenance["doctest_functions"] == {"train": 0, "validation": 0, "test": 0}


def test_text_scores_and_per_example():
    data = build("summarize-python")
    outs = [ex.target for ex in data.test]
    got = score_generative("summarize-python", data.test, outs)
    assert got["bleu4"] == pytest.approx(1.0) and got["rouge_l"] == pytest.approx(1.0)
    bad = score_generative("summarize-python", data.test, ["nothing"] * len(outs))
    assert bad["bleu4"] < 0.2
    comp = build("complete-java")
    per = per_example_scores("complete-java", comp.test, ["x"] * len(comp.test), "edit_similarity")
    assert len(per) == len(comp.test) and all(0 <= s < 1 for s in per)
    with pytest.raises(TaskError, match="2 outputs"):
        score_generative("complete-java", comp.test[:3], ["a", "b"])
    with pytest.raises(TaskError, match="no metric 'bleu4'"):
        per_example_scores("complete-java", comp.test, outs, "bleu4")


def test_replies_are_read_like_a_chat_model_writes_them():
    comp = build("complete-python").test[:1]
    line = comp[0].target
    for reply in (line, f"  {line}\n", f"```python\n    {line}\n```", f"\n{line}\n    more = 1\n"):
        assert score_generative("complete-python", comp, [reply])["exact_match"] == 1.0, reply
    summ = build("summarize-go").test[:1]
    assert score_generative("summarize-go", summ, [f"\n{summ[0].target}\nMore text."])["bleu4"] == 1.0


@pytest.mark.parametrize("lang", LANGUAGES)
def test_repair_parses_metric(lang):
    data = build(f"repair-{lang}")
    ex = data.test[:4]
    good = score_generative(f"repair-{lang}", ex, [f"```{lang}\n{e.target}\n```" for e in ex])
    assert good["exact_match"] == 1.0 and good["parses"] == 1.0
    broken = per_example_scores(
        f"repair-{lang}", ex, [e.target[: len(e.target) // 2] + " ((" for e in ex], "parses"
    )
    assert broken == [0.0] * len(ex)


# ------------------------------------------------------------------------------- generate-python

MODULE = '''
import math


def area(r):
    """Area of a circle of radius r.

    >>> round(area(1.0), 4)
    3.1416
    >>> area(0)
    0.0
    """
    value = math.pi * r * r
    return value


def wrong(x):
    """A doctest that its own body fails.

    >>> wrong(1)
    3
    """
    y = x + 1
    return y


def plain(a, b):
    """Add two numbers without examples."""
    s = a + b
    return s


class Box:
    def __init__(self, n):
        self.n = n

    def double(self):
        """Twice the content of the box.

        >>> Box(3).double()
        6
        """
        out = self.n * 2
        return out

    @staticmethod
    def twice(v):
        """Twice v, static.

        >>> Box.twice(4)
        8
        """
        out = v * 2
        return out
'''


@dataclass
class Outcome:
    passed: bool


def subprocess_runner(programs, desc=None, **_):
    """Stands in for sefusion.sandbox.run_all: each program in `python -I`, exit 0 = passed, in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(program: str) -> Outcome:
        r = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=60)
        return Outcome(r.returncode == 0)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, programs))


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    (root / "geomod.py").write_text(textwrap.dedent(MODULE).lstrip())
    made = [generate_example(f) for f in from_tree("python", root).functions]
    return {ex.meta["function"]: ex for ex in made if ex is not None}


def test_generate_prompt_and_target(problems):
    area = problems["area"]
    assert area.prompt.startswith("Complete this Python function. Reply with its body only.\n```python\n")
    assert (
        'def area(r):\n    """Area of a circle of radius r.' in area.prompt and ">>> area(0)" in area.prompt
    )
    assert area.target == "    value = math.pi * r * r\n    return value"
    assert area.meta["module"] == "geomod" and area.meta["qualname"] == "area"
    assert problems["double"].meta["qualname"] == "Box.double"
    assert "tests" not in problems["plain"].meta
    ast.parse(generated_function(area, area.target))


def test_pass_at_1_executes_doctests(problems):
    p = problems
    cases = [
        (p["area"], p["area"].target, 1.0),
        (p["double"], p["double"].target, 1.0),  # a method: replaced on its class
        (p["twice"], p["twice"].target, 1.0),  # a staticmethod stays one
        (p["wrong"], p["wrong"].target, math.nan),  # its own body fails its doctest: not a problem
        (p["plain"], p["plain"].target, math.nan),  # no doctest
        (p["area"], "    return 0.0", 0.0),
        (p["area"], "value = math.pi * r * r\nreturn value", 1.0),  # unindented body: indented again
        (p["double"], "    return self.n * 3", 0.0),
        (p["twice"], "```python\ndef twice(v):\n    return v + v\n```", 1.0),  # a whole def, fenced
        # the reply's own def after its imports; a statement after it (here one that would undo it) is not run
        (
            p["area"],
            "```python\nimport math\n\ndef area(r):\n    return math.pi * r * r\narea = None\n```",
            1.0,
        ),
        (p["double"], "```python\nclass Box:\n    def double(self):\n        return self.n * 2\n```", 1.0),
        (p["double"], "```python\nclass Box:\n    def double(self):\n        return self.n\n```", 0.0),
        # a method whose body holds a string at column 0 (no dedent parses it); line breaks as bare CRs
        (
            p["double"],
            "```python\nclass Box:\n    def double(self):\n        s = '''\nx'''\n        return self.n * 2\n```",
            1.0,
        ),
        (p["area"], "```python\nx = 1\rdef area(r):\r    return math.pi * r * r\n```", 1.0),
        (p["area"], "    return ((", 0.0),
        (p["area"], "", 0.0),
        (p["area"], "def area(r):\n    return 0\nimport sys\nsys.exit(0)", 0.0),  # exits 0 before any test
    ]
    got = per_example_scores(
        "generate-python", [c[0] for c in cases], [c[1] for c in cases], runner=subprocess_runner
    )
    for (ex, out, want), score in zip(cases, got, strict=True):
        assert score == want or (math.isnan(want) and math.isnan(score)), (ex.meta["function"], out)
    parsed = per_example_scores(
        "generate-python", [p["area"]] * 3, ["    return ((", "", "  x = 1"], "parses"
    )
    assert parsed == [0.0, 0.0, 1.0]
    summary = score_generative(
        "generate-python", [p["area"], p["plain"]], ["    return 0.0", ""], runner=subprocess_runner
    )
    assert summary == {"n": 2.0, "pass@1": 0.0, "problems": 1.0, "parses": 0.5}


def test_corpus_keeps_python_qualname_and_whole_docstring():
    from sefusion.tasks.corpus import Function
    from sefusion.tasks.corpus_extract import extract

    got = {f.name: f for f in extract("python", textwrap.dedent(MODULE), "geomod.py", "s")}
    assert got["double"].qualname == "Box.double" and got["area"].qualname == "area"
    assert got["area"].docstring == "Area of a circle of radius r."
    assert got["area"].doc_full.startswith("Area of a circle of radius r.\n\n>>> round(area(1.0), 4)")
    src = (
        'def f(a):\n    """Outer one here."""\n    def g(b):\n        """Inner one here."""\n        c = b\n'
    )
    nested = extract("python", src + "        return c\n    return g(a)\n", "m.py", "s")
    assert {f.qualname for f in nested} == {"f", "f.<locals>.g"}
    old = got["area"].to_json()
    del old["doc_full"], old["qualname"]  # a record written before these fields existed
    assert Function.from_json(old).doc_full == "" and Function.from_json(got["area"].to_json()) == got["area"]


# ----------------------------------------------------------------------------------------- translate


def test_translate_reads_pairs_and_names_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"source": f"int f{i}() {{ return {i}; }}", "target": f"def f{i}():\n    return {i}"}
        for i in range(40)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = build_translate(path, "java", "python", sizes={"train": 100, "validation": 100, "test": 100})
    assert sum(len(data.split(s)) for s in ("train", "validation", "test")) == 40
    assert data.test and data.test[0].prompt.startswith("Translate this Java code to Python.")
    assert build_translate(path, "java", "python").fingerprint == data.fingerprint
    outs = [ex.target for ex in data.test]
    assert score_generative("translate", data.test, outs) == {
        "n": len(outs),
        "bleu4": 1.0,
        "exact_match": 1.0,
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not a JSON line"):
        build_translate(bad, "java", "python")
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"source": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: .*'target'"):
        build_translate(bad, "java", "python")
    bad.write_text(json.dumps({**rows[0], "target_lang": "go"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: 'target_lang' is 'go'"):
        build_translate(bad, "java", "python")


@pytest.mark.slow
def test_standard_library_generative_tasks(tmp_path):
    sizes = {}
    for name in ("generate-python", "summarize-python", "repair-python", "complete-python"):
        data = build_generative(name, cache=tmp_path)
        sizes[name] = [len(data.split(s)) for s in ("train", "validation", "test")]
        assert min(sizes[name]) > 100
    doctests = build_generative("generate-python", cache=tmp_path).provenance["doctest_functions"]
    assert doctests["test"] > 10


def test_pass_at_1_without_a_sandbox_is_one_clear_error(problems, monkeypatch):
    monkeypatch.setitem(sys.modules, "sefusion.sandbox", None)  # as if the sandbox were not installed
    with pytest.raises(TaskError, match="pass@1 runs code in sefusion.sandbox"):
        score_generative("generate-python", [problems["area"]], ["    return 0"])


def test_doctests_from_held_out_moves_validation_problems_to_test(tmp_path):
    for i in range(30):
        (tmp_path / f"m{i}.py").write_text(
            f'def f{i}(x):\n    """Add {i} to x here.\n\n    >>> f{i}(1)\n    {i + 1}\n    """\n'
            f"    y = x + {i}\n    return y\n\n\n"
            f'def g{i}(x):\n    """Plain function number {i}."""\n    y = x * {i}\n    return y\n'
        )
    functions = from_tree("python", tmp_path).functions
    sizes = {"train": 100, "validation": 100, "test": 100}
    plain = build_generative_from(
        "generate-python", functions, sizes=sizes, options={"doctests_from": "test"}
    )
    moved = build_generative_from("generate-python", functions, sizes=sizes)  # held-out: the default
    n = plain.provenance["doctest_functions"]
    assert n["validation"] > 0 and n["test"] > 0 and moved.train == plain.train
    assert moved.provenance["doctest_functions"] == {
        "train": n["train"],
        "validation": 0,
        "test": n["validation"] + n["test"],
    }
    assert plain.test[: n["test"]] == [ex for ex in plain.test if "tests" in ex.meta]  # problems come first
    got = per_example_scores(
        "generate-python", moved.test, [ex.target for ex in moved.test], runner=subprocess_runner
    )
    assert [x for x in got if not math.isnan(x)] == [1.0] * (n["validation"] + n["test"])
    with pytest.raises(TaskError, match="doctests_from must be"):
        build_generative_from("generate-python", functions, options={"doctests_from": "all"})

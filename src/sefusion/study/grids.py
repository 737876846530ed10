"""The study's rows and its selection rule; each method's candidates are data in its registration.

Every candidate is scored on the validation split only; the chosen one is then scored once on test.
Merge methods pick the candidate with the highest average normalized validation score (score / the task's
own expert's validation score), ties going to the earlier candidate. A method whose grid names a
`per_task` parameter (TALL-Masks and Scaling-Masks: lambda_t) lets each task take the value best for
itself, since task t's mask depends on its own value only.

The method rows, and the sets below, are read from the registry (sefusion.registry.StudyGrid) on first
use, so that importing this module does not import the methods (and torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from ..registry import METHODS, MethodSpec

BASELINES = ("pretrained", "individual", "multitask")
# examples of its own train split each expert's statistics come from, per budget (the tests' tiny budgets:
# 8). quick: the exact Fisher costs one backward pass per class per example, so the demo takes few
STATS_EXAMPLES = {"full": 256, "quick": 16}


@cache
def _study_specs() -> tuple[MethodSpec, ...]:
    return tuple(sorted((s for s in METHODS if s.study is not None), key=lambda s: s.study.rank))  # type: ignore[union-attr]


def _derived() -> dict[str, Any]:
    specs = _study_specs()
    fusion = tuple(s.name for s in specs)
    return {
        "FUSION": fusion,
        "ROWS": BASELINES + fusion,
        "PER_TASK": frozenset(s.name for s in specs if s.study.per_task),  # type: ignore[union-attr]
        "DATA_AWARE": frozenset(s.name for s in specs if s.data_use),
        "PAIR_ONLY": frozenset(s.name for s in specs if s.pair_only),
        "CURVES": {s.name: s.study.curve for s in specs if s.study.curve},  # type: ignore[union-attr]
    }


def __getattr__(name: str) -> Any:
    """FUSION, ROWS, PER_TASK, DATA_AWARE, PAIR_ONLY, CURVES, PLEAS_BUDGETS: read from the registry."""
    derived = _derived()
    if name == "PLEAS_BUDGETS":
        return derived["CURVES"]["pleas"][1]
    if name in derived:
        return derived[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grid(method: str, budget: str) -> list[dict[str, Any]]:
    """The candidates for `method` at `budget` (full, quick; any other is the tests' tiny one)."""
    study = METHODS.get(method).study
    if study is None:
        raise KeyError(method)
    return study.candidates(budget)


def stats_examples(budget: str) -> int:
    """Examples of its own train split each expert's statistics come from at `budget`."""
    return STATS_EXAMPLES.get(budget, 8)


def avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def avg_defined(values: Sequence[float]) -> float:
    """The mean of the values that are numbers: a task whose expert scores 0 has no normalized score."""
    return avg([v for v in values if v == v])


def normalize(scores: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """score / reference per task (the reference being the task's individual expert on the same split)."""
    out = {}
    for task, s in scores.items():
        r = reference[task]
        out[task] = s / r if r else float("nan")
    return out


def select(
    candidates: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, float]],
    reference: Mapping[str, float],
) -> int:
    """Index of the candidate with the best average normalized validation score (first among equals)."""
    best, best_value = 0, float("-inf")
    for i, scores in enumerate(validation):
        value = avg(list(normalize(scores, reference).values()))
        if value > best_value:
            best, best_value = i, value
    return best


def select_per_task(
    values: Sequence[float], validation: Sequence[Mapping[str, float]], tasks: Sequence[str]
) -> dict[str, float]:
    """For each task, the lambda_t whose validation score on that task is best (first among equals)."""
    chosen = {}
    for task in tasks:
        best_i = max(range(len(values)), key=lambda i: (validation[i][task], -i))
        chosen[task] = values[best_i]
    return chosen

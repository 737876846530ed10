"""Hyper-parameter grids of the study (METHODS.md and issue 5) and the selection rule.

Every candidate is scored on the validation split only; the chosen one is then scored once on test.
Merge methods pick the candidate with the highest average normalized validation score (score / the task's
own expert's validation score), ties going to the earlier candidate. TALL-Masks and Scaling-Masks pick
lambda_t per task: task t's mask depends on its own lambda_t only, so each task takes the value that is
best for itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BASELINES = ("pretrained", "individual", "multitask")
FUSION = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "consensus",
    "tall_masks",
    "scaling_masks",
    "cabs",
    "fisher",
    "regmean",
    "pleas",
)
ROWS = BASELINES + FUSION
PER_TASK = frozenset({"tall_masks", "scaling_masks"})
# methods that read each expert's statistics on its own train data (METHODS.md, "Data-aware methods")
DATA_AWARE = frozenset({"fisher", "regmean", "pleas"})
PAIR_ONLY = frozenset({"pleas"})  # two models: a row only in two-task scenarios
# PLeaS budgets below the row's 1.0, reported as a size/score curve beside the row (the paper's trade-off:
# budget b keeps the FFN's (1 - b) least-matched units of both models, an FFN (2 - b) times as wide)
PLEAS_BUDGETS = (0.75, 0.5)

_LAMBDA_FULL = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1.0
_LAMBDA_QUICK = (0.2, 0.4, 0.6, 0.8, 1.0)
_MASK_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
_CABS_LAMBDAS = (0.6, 0.8, 1.0)
_TIES_LAMBDA_QUICK = (0.4, 0.7, 1.0)


def grid(method: str, budget: str) -> list[dict[str, Any]]:
    """The candidates for `method`. `full` is the issue's grid; `quick` thins the lambda axis (demo time);
    any other budget (the tests' tiny ones) keeps two lambdas, enough to exercise the selection."""
    lam = _LAMBDA_FULL if budget == "full" else _LAMBDA_QUICK if budget == "quick" else (0.5, 1.0)
    if method == "linear":
        return [{}]
    if method == "task_arithmetic":
        return [{"lambda": x} for x in lam]
    small = budget not in ("full", "quick")
    if method == "ties":
        # quick: three lambdas per density (the demo's 15-minute budget); full: the ten
        ties_lam = _TIES_LAMBDA_QUICK if budget == "quick" else lam
        return [{"density": d, "lambda": x} for d in ((0.2,) if small else (0.1, 0.2, 0.3)) for x in ties_lam]
    if method == "dare_ties":
        # DARE's rescale keeps each expert's expected vector, so lambda stays 1 (the grid)
        return [{"density": d, "lambda": 1.0} for d in (0.1, 0.3, 0.5)]
    if method == "consensus":
        return [{"alpha": x, "k": 2, "lambdas": 0.4} for x in lam]
    if method == "cabs":
        # the grid is n:m; CABS's masks are disjoint, so each kept entry enters at full weight and
        # lambda only trims the sum: three values near METHODS.md's default 1.0, not TIES's ten
        nm = ((2, 8),) if small else ((1, 4), (2, 8), (8, 32))
        return [
            {"n": n, "m": m, "lambda": x}
            for n, m in nm
            for x in (_CABS_LAMBDAS if budget == "full" else _CABS_LAMBDAS[-1:])  # quick: METHODS.md's 1.0
        ]
    if method in PER_TASK:
        return [{"lambdas": x} for x in _MASK_LAMBDAS]
    # the data-aware methods run at METHODS.md's defaults: their knob is the data, `stats_examples`
    if method == "fisher":
        return [{"floor": 1e-6, "normalize": True}]
    if method == "regmean":
        return [{"alpha": 0.95}]
    if method == "pleas":
        return [{"budget": 1.0}]  # the base's size, like every other row; < 1: PLEAS_BUDGETS
    raise KeyError(method)


def stats_examples(budget: str) -> int:
    """Examples of its own train split each expert's statistics come from: METHODS.md's default (256) at
    `full`, fewer for the demo and the tests' tiny budgets."""
    # quick: 16 (the exact Fisher costs one backward pass per class per example: 64 examples of the
    # 8-class exception task took 78 s, a tenth of the demo's budget)
    return 256 if budget == "full" else 16 if budget == "quick" else 8


def avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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

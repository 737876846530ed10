"""A study's rows read with their uncertainty: intervals, normalized score and gain kept with intervals,
flags, the paired differences the report compares, each task's facts, and the scores file they come from.

Everything is computed from the per-example test scores the evaluations kept (`scores.json` holds them,
with each example's source file), so a reader can recompute every interval of results.json.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import gains, scores
from . import uncertainty as U
from .api import Row

log = logging.getLogger("sefusion")

MULTITASK = "multitask"
BASELINE_ROW = "no_training_baseline"  # the no-training baseline's per-example scores in scores.json
METHOD = "percentile bootstrap over the test examples, resampling whole source files (cluster bootstrap)"


def comparison_pairs(methods: Sequence[str], multitask: str = MULTITASK) -> list[tuple[str, str]]:
    """The pairs (a, b) whose paired difference a - b the report reads: every fused row (multitask too)
    against the individual experts, Scaling-Masks against TALL-Masks, every other row against the
    `multitask` row (the generative study's is multitask_lora: its multitask_full is one of the others)."""
    fused = [m for m in methods if m not in (gains.PRETRAINED, gains.EXPERT, multitask)]
    has_mt = multitask in methods
    pairs = [(m, gains.EXPERT) for m in ([multitask] if has_mt else []) + fused]
    if "tall_masks" in methods and "scaling_masks" in methods:
        pairs.append(("scaling_masks", "tall_masks"))
    if has_mt:
        pairs += [(m, multitask) for m in fused]
    return pairs


def _finite(iv: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An interval dict with NaN written as None (results.json stays standard JSON)."""
    if iv is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in iv.items()}


def attach_readings(
    rows: Sequence[Row],
    per_example: Mapping[str, Mapping[str, Any]],  # row -> task -> per-example scores (numpy vectors)
    clusters: Mapping[str, Sequence[str]],
    chance: Mapping[str, float | None],
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    b: int = U.B_DEFAULT,
) -> dict[str, dict[str, Any]]:
    """Give each row its `readings` per task (interval of the test score; normalized score and gain kept
    with intervals; flags below pretrained / below chance) and return the paired differences per task
    (of `pairs`; None: `comparison_pairs` of the rows). Rows or tasks without per-example scores are left
    without readings."""
    if pairs is None:
        pairs = comparison_pairs([r["method"] for r in rows])
    table = gains.task_intervals(clusters, per_example, pairs, b=b)
    for row in rows:
        cells: dict[str, Any] = {}
        for task, info in table.items():
            cell = info["rows"].get(row["method"])
            if cell is None:
                continue
            cells[task] = _reading(row, task, cell, per_example, chance.get(task))
        if cells:
            row["readings"] = cells
    return {task: info["differences"] for task, info in table.items()}


def _reading(
    row: Row, task: str, cell: Mapping[str, Any], per_example: Mapping[str, Mapping[str, np.ndarray]],
    chance: float | None,
) -> dict[str, Any]:  # fmt: skip
    """One row's reading on one task; the gain kept is None where the expert does not beat pretrained."""
    expert = per_example.get(gains.EXPERT, {}).get(task)
    pre = per_example.get(gains.PRETRAINED, {}).get(task)
    out: dict[str, Any] = {"interval": _finite(cell["interval"])}
    if "normalized" in cell:
        out["normalized"] = _finite(cell["normalized"])
    if "gain_kept" in cell:
        defined = expert is not None and pre is not None and float(expert.mean() - pre.mean()) > 0
        out["gain_kept"] = _finite(cell["gain_kept"]) if defined else None
    if "below_pretrained_significant" in cell:
        out["below_pretrained_significant"] = cell["below_pretrained_significant"]
    pre_score = float(pre.mean()) if pre is not None and row["method"] != gains.PRETRAINED else None
    out["flags"] = gains.flags(row["test"][task], pre_score, chance)
    return out


def task_facts(data: Mapping[str, Any], specs: Mapping[str, Any], *, b: int = U.B_DEFAULT) -> dict[str, Any]:
    """Per task its data fingerprint, test examples and files, and no-training baseline (with interval; its
    per-example scores as "baseline_scores"); a baseline that cannot be computed is logged, left None."""
    from ..errors import SefusionError
    from ..tasks.base import data_fingerprint, example_clusters

    out: dict[str, Any] = {}
    for t, d in data.items():
        try:
            out[t] = gains.task_facts(d, specs[t], b=b, with_scores=True)
        except (SefusionError, ValueError) as exc:
            log.warning("task %s: no-training baseline not computed (%s)", t, exc)
            test = list(d.splits.get("test") or [])
            out[t] = {"fingerprint": d.fingerprint or data_fingerprint(d), "test_examples": len(test),
                      "test_files": len(set(example_clusters(test))), "baseline": None}  # fmt: skip
    return out


def scores_file(
    tasks: Mapping[str, Mapping[str, Any]], per_example: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """scores.json: each task's example files and fingerprint, each row's per-example test scores."""
    return scores.scores_document(
        tasks, {r: {t: list(v) for t, v in per.items()} for r, per in per_example.items()}
    )


def about(b: int = U.B_DEFAULT) -> dict[str, Any]:
    """How the intervals of results.json were made (its "uncertainty" entry)."""
    return {"level": U.LEVEL, "resamples": b, "seed": U.SEED, "method": METHOD, "scores_file": "scores.json",
            "significant": "a difference whose interval excludes 0"}  # fmt: skip


__all__ = ["BASELINE_ROW", "about", "attach_readings", "comparison_pairs", "scores_file", "task_facts"]

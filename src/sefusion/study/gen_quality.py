"""The quality of a row's generated code with its uncertainty: parse rate and ruff findings per 100 parsed
functions, each with a 95% bootstrap interval, and paired differences between rows.

Both are recomputed from the replies the evaluation records keep (ruff on each reply, as
`sefusion.gen.quality` does), so a committed study gains them without scoring again. The test tasks'
replies are resampled by source file (the cluster bootstrap of the scores); HumanEval's by problem.
Findings per 100 parsed functions is a ratio of two sums, 100 * sum(findings) / sum(parsed), computed on
each resample; a resample with no parsed function leaves it undefined, and the interval unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..gen.quality import Analysis, analyze_language
from . import uncertainty as U


def task_analyses(examples: Sequence[Any], kind: str, recs: Sequence[Mapping[str, Any]]) -> list[Analysis]:
    """Each reply's analysis, as whole functions (generate: the example's signature + the reply's body;
    repair: the reply's code), in the task's language (ruff's findings for Python only)."""
    from ..tasks.generative import extract_code, generated_function

    done = [r for r in recs if "reply" in r]
    codes = [
        generated_function(examples[r["index"]], r["reply"])
        if kind == "generate"
        else extract_code(r["reply"])
        for r in done
    ]
    lang = examples[0].meta.get("language", "python") if examples else "python"
    return analyze_language(codes, lang)


def task_clusters(recs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The source file of each analysed reply (in `task_analyses`' order)."""
    return [r["file"] for r in recs if "reply" in r]


def _vectors(analyses: Sequence[Analysis]) -> tuple[np.ndarray, np.ndarray]:
    parsed = np.array([float(a.parses) for a in analyses])
    findings = np.array(
        [float(sum(a.findings.values())) if a.findings is not None else np.nan for a in analyses]
    )
    return parsed, findings


def _per_100(findings: np.ndarray, parsed: np.ndarray) -> np.ndarray:
    """Findings per 100 parsed functions on each resample; NaN where nothing parsed."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(parsed > 0, 100 * findings / np.where(parsed > 0, parsed, 1), np.nan)


def _point_per_100(findings: np.ndarray, parsed: np.ndarray) -> float:
    return float(100 * findings.sum() / parsed.sum()) if parsed.sum() else math.nan


def _interval(point: float, reps: np.ndarray) -> U.Interval:
    if not np.isfinite(point) or not np.isfinite(reps).all():
        return U.Interval(float(point), None, None)
    return U.percentile_interval(point, reps)


def intervals(
    analyses: Sequence[Analysis], clusters: Sequence[Hashable] | None = None, *, b: int = U.B_DEFAULT
) -> dict[str, dict[str, Any]]:
    """{parse_rate, findings_total_per_100}: each an interval over resamples of the replies."""
    parsed, findings = _vectors(analyses)
    w = U.resample_weights(parsed.size, clusters, b=b)
    p, f = w @ parsed, w @ findings
    return {
        "parse_rate": _interval(float(parsed.mean()), p / w.sum(axis=1)).as_dict(),
        "findings_total_per_100": _interval(_point_per_100(findings, parsed), _per_100(f, p)).as_dict(),
    }


def difference(
    a: Sequence[Analysis],
    other: Sequence[Analysis],
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = U.B_DEFAULT,
) -> dict[str, dict[str, Any]]:
    """Paired differences a - other of both measures, two rows' replies to the same prompts on the same
    resamples; `significant` when the interval excludes 0."""
    if len(a) != len(other):
        raise U.UncertaintyError(f"the two rows analysed {len(a)} and {len(other)} replies")
    (pa, fa), (pc, fc) = _vectors(a), _vectors(other)
    w = U.resample_weights(pa.size, clusters, b=b)
    rate = _interval(float(pa.mean() - pc.mean()), (w @ (pa - pc)) / w.sum(axis=1))
    point = _point_per_100(fa, pa) - _point_per_100(fc, pc)
    per_100 = _interval(point, _per_100(w @ fa, w @ pa) - _per_100(w @ fc, w @ pc))
    return {k: {**iv.as_dict(), "significant": iv.significant}
            for k, iv in (("parse_rate", rate), ("findings_total_per_100", per_100))}  # fmt: skip


__all__ = ["difference", "intervals", "task_analyses", "task_clusters"]

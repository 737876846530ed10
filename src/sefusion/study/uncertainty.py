"""How sure a score is: bootstrap intervals over the test examples, paired differences, ratios, seeds.

Every interval is a 95% percentile bootstrap interval (B = 2000 resamples, seeded, so the same inputs
give the same interval on every machine). A resample is a weight matrix W (B, n): W[b, i] is how often
example i appears in resample b.

* iid: n examples drawn with replacement.
* cluster: examples that share a source file are not independent (one file can supply a quarter of a
  split), so whole files are drawn with replacement and each brings all its examples. With one example
  per file this is exactly the iid bootstrap (same draws).

A score that is a mean of per-example values (accuracy: 0/1; MRR: reciprocal ranks) is computed for all
resamples at once as (W @ x) / W.sum(1). Any other statistic (corpus BLEU) is a function of the
resampled example indices, called once per resample.

Rows scored on the same examples are compared on the *same* resamples: the paired difference, the
normalized score fused / expert and the gain kept (fused - pretrained) / (expert - pretrained) are
computed per resample, so what the rows share cancels. A difference is significant only when its
interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SefusionError

B_DEFAULT = 2000
LEVEL = 0.95
SEED = 0

Statistic = Callable[[np.ndarray], float]  # resampled example indices (with repeats) -> the score


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval; `low`/`high` None when the interval is unbounded (a
    ratio whose denominator reaches 0 or changes sign on some resample)."""

    estimate: float
    low: float | None
    high: float | None
    level: float = LEVEL
    resamples: int = B_DEFAULT

    @property
    def bounded(self) -> bool:
        return self.low is not None and self.high is not None

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies wholly above or below `value` (a significant difference from it)."""
        if not self.bounded:
            return False
        return self.low > value or self.high < value  # type: ignore[operator]

    @property
    def significant(self) -> bool:
        return self.excludes(0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


class UncertaintyError(SefusionError, ValueError):
    """Scores or clusters that cannot be resampled (empty, different lengths, not finite)."""


# ----------------------------------------------------------------------------------------- resampling


def cluster_ids(clusters: Sequence[Hashable] | None, n: int) -> np.ndarray:
    """Cluster index of each example, numbered by first appearance; None: every example its own cluster."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise UncertaintyError(f"{len(clusters)} cluster labels for {n} examples")
    first: dict[Hashable, int] = {}
    return np.array([first.setdefault(c, len(first)) for c in clusters], dtype=np.int64)


def resample_weights(
    n: int, clusters: Sequence[Hashable] | None = None, *, b: int = B_DEFAULT, seed: int = SEED
) -> np.ndarray:
    """(b, n) counts: how often each example is drawn in each resample (whole clusters at a time)."""
    if n < 1:
        raise UncertaintyError("no examples to resample")
    if b < 1:
        raise UncertaintyError(f"the number of resamples must be positive, got {b}")
    ids = cluster_ids(clusters, n)
    k = int(ids.max()) + 1
    draws = np.random.default_rng(seed).integers(0, k, size=(b, k))
    offsets = draws + k * np.arange(b)[:, None]
    counts = np.bincount(offsets.ravel(), minlength=b * k).reshape(b, k)
    return counts[:, ids]


def _vector(x: Sequence[float] | np.ndarray, n: int | None = None, what: str = "scores") -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise UncertaintyError(f"{what} must be a non-empty vector, got shape {v.shape}")
    if n is not None and v.size != n:
        raise UncertaintyError(f"{what} have {v.size} entries but the other row has {n}")
    if not np.isfinite(v).all():
        raise UncertaintyError(f"{what} hold NaN or infinite values")
    return v


def replicates(
    weights: np.ndarray, scores: np.ndarray | None = None, statistic: Statistic | None = None
) -> np.ndarray:
    """The statistic on every resample: the weighted mean of `scores`, or `statistic(indices)`."""
    if statistic is None:
        if scores is None:
            raise UncertaintyError("replicates need per-example scores or a statistic")
        return (weights @ scores) / weights.sum(axis=1)
    idx = np.arange(weights.shape[1])
    return np.array([statistic(np.repeat(idx, w)) for w in weights], dtype=np.float64)


def percentile_interval(estimate: float, reps: np.ndarray, level: float = LEVEL) -> Interval:
    """The percentile interval of replicates `reps` around `estimate`."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), level, int(reps.size))


# ---------------------------------------------------------------------------------------- intervals


def interval(
    scores: Sequence[float] | np.ndarray | None = None,
    clusters: Sequence[Hashable] | None = None,
    *,
    statistic: Statistic | None = None,
    n: int | None = None,
    b: int = B_DEFAULT,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """The interval of one row's score on one task: the mean of `scores` (per-example 0/1 correctness or
    reciprocal ranks), or `statistic(indices)` over `n` examples (a corpus-level metric)."""
    x = None if scores is None else _vector(scores)
    size = x.size if x is not None else n
    if size is None:
        raise UncertaintyError("interval needs per-example scores, or a statistic and n")
    w = resample_weights(size, clusters, b=b, seed=seed)
    point = float(x.mean()) if statistic is None else float(statistic(np.arange(size)))  # type: ignore[union-attr]
    return percentile_interval(point, replicates(w, x, statistic), level)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b_scores: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = B_DEFAULT,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of score(a) - score(b) for two rows scored on the same examples (the same resamples)."""
    x = _vector(a, what="scores of the first row")
    y = _vector(b_scores, x.size, "scores of the second row")
    w = resample_weights(x.size, clusters, b=b, seed=seed)
    return percentile_interval(float(x.mean() - y.mean()), replicates(w, x - y), level)


def paired_statistic_difference(
    stat_a: Statistic,
    stat_b: Statistic,
    n: int,
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = B_DEFAULT,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of stat_a - stat_b (corpus-level metrics of two rows) on the same resampled indices."""
    w = resample_weights(n, clusters, b=b, seed=seed)
    reps = replicates(w, statistic=stat_a) - replicates(w, statistic=stat_b)
    point = float(stat_a(np.arange(n)) - stat_b(np.arange(n)))
    return percentile_interval(point, reps, level)


def _ratio(num: np.ndarray, den: np.ndarray, point: float, point_den: float, level: float) -> Interval:
    """Percentile interval of num / den; unbounded when a resample's denominator is 0 or changes sign."""
    if point_den == 0 or not np.all(np.sign(den) == np.sign(point_den)):
        return Interval(point if point_den != 0 else math.nan, None, None, level, int(den.size))
    return percentile_interval(point, num / den, level)


def normalized(
    fused: Sequence[float] | np.ndarray,
    expert: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = B_DEFAULT,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of the normalized score mean(fused) / mean(expert) on the same resamples."""
    f = _vector(fused, what="fused scores")
    e = _vector(expert, f.size, "expert scores")
    w = resample_weights(f.size, clusters, b=b, seed=seed)
    den = e.mean()
    point = float(f.mean() / den) if den != 0 else math.nan
    return _ratio(replicates(w, f), replicates(w, e), point, float(den), level)


def gain_kept(
    fused: Sequence[float] | np.ndarray,
    expert: Sequence[float] | np.ndarray,
    pretrained: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = B_DEFAULT,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of (fused - pretrained) / (expert - pretrained): the share of the expert's gain over the
    pretrained row that fusion keeps (1: all of it; 0: none; < 0: worse than not fine-tuning)."""
    f = _vector(fused, what="fused scores")
    e = _vector(expert, f.size, "expert scores")
    p = _vector(pretrained, f.size, "pretrained scores")
    w = resample_weights(f.size, clusters, b=b, seed=seed)
    den = float(e.mean() - p.mean())
    point = float((f.mean() - p.mean()) / den) if den != 0 else math.nan
    return _ratio(replicates(w, f - p), replicates(w, e - p), point, den, level)


def compare_rows(
    rows: Mapping[str, Sequence[float] | np.ndarray],
    pairs: Sequence[tuple[str, str]],
    clusters: Sequence[Hashable] | None = None,
    *,
    b: int = B_DEFAULT,
    seed: int = SEED,
) -> dict[str, dict[str, Any]]:
    """Per row its interval, per pair (a, b) the paired interval of a - b with its significance flag;
    every interval on the same resamples. Keys: row names, and "a - b" for the pairs."""
    out: dict[str, dict[str, Any]] = {}
    for name, scores in rows.items():
        out[name] = interval(scores, clusters, b=b, seed=seed).as_dict()
    for first, second in pairs:
        for name in (first, second):
            if name not in rows:
                raise UncertaintyError(f"no per-example scores for row '{name}'")
        d = paired_difference(rows[first], rows[second], clusters, b=b, seed=seed)
        out[f"{first} - {second}"] = {**d.as_dict(), "significant": d.significant}
    return out


# -------------------------------------------------------------------------------------------- seeds


def over_seeds(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of one score over seeds; sd None for a single seed."""
    v = _vector(values, what="per-seed scores")
    sd = float(v.std(ddof=1)) if v.size > 1 else None
    return {"mean": float(v.mean()), "sd": sd, "n": int(v.size)}


def format_over_seeds(summary: Mapping[str, Any], digits: int = 3) -> str:
    """'0.812 ± 0.004' (n > 1 seeds) or '0.812'."""
    mean = f"{summary['mean']:.{digits}f}"
    return mean if summary.get("sd") is None else f"{mean} ± {summary['sd']:.{digits}f}"


def format_interval(iv: Interval | Mapping[str, Any], digits: int = 3) -> str:
    """'0.812 [0.790, 0.835]', or '0.812 [unbounded]'."""
    d = iv.as_dict() if isinstance(iv, Interval) else iv
    if d.get("low") is None or d.get("high") is None:
        return f"{d['estimate']:.{digits}f} [unbounded]"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


__all__ = [
    "B_DEFAULT", "LEVEL", "Interval", "UncertaintyError", "cluster_ids", "compare_rows", "format_interval",
    "format_over_seeds", "gain_kept", "interval", "normalized", "over_seeds", "paired_difference",
    "paired_statistic_difference", "percentile_interval", "replicates", "resample_weights",
]  # fmt: skip

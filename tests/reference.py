"""An independent float64 numpy reference of docs/methods.md, written for clarity, not speed.

It deliberately does not import sefusion and takes other routes than the library: sorting where the
library selects, Decimal where it uses Fraction, Python loops over entries and blocks where it
vectorizes. Arrays in, arrays out (float64); DARE takes its Bernoulli keep-masks as an argument.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def task_vectors(base, experts) -> list[np.ndarray]:
    return [f64(e) - f64(base) for e in experts]


def keep_count(density: float, n: int) -> int:
    """k = ceil(density * n), density taken as the decimal it is written as."""
    return math.ceil(Decimal(repr(float(density))) * n)


def topk_mask(x, k: int) -> np.ndarray:
    """Exactly min(k, nnz) entries: order by (-|x|, flat index) with a stable sort, take the first k non-zero."""
    a = np.abs(f64(x)).ravel()
    order = np.lexsort((np.arange(a.size), -a))  # last key is primary
    keep = np.zeros(a.size, dtype=bool)
    keep[order[:k]] = True
    keep &= a != 0
    return keep.reshape(np.shape(x))


def trim(x, density: float) -> np.ndarray:
    x = f64(x)
    return np.where(topk_mask(x, keep_count(density, x.size)), x, 0.0)


def ties_merge(trimmed: list[np.ndarray], weights, merge: str) -> np.ndarray:
    """Elect + disjoint merge, one entry at a time."""
    shape = trimmed[0].shape
    flat = [t.ravel() for t in trimmed]
    out = np.zeros(flat[0].size)
    for i in range(out.size):
        gamma = np.sign(sum(w * t[i] for w, t in zip(weights, flat, strict=True)))
        members = [
            (w, t[i]) for w, t in zip(weights, flat, strict=True) if t[i] != 0 and np.sign(t[i]) == gamma
        ]
        total = sum(w * v for w, v in members)
        if merge == "sum":
            out[i] = total
        else:
            den = sum(w for w, _ in members)
            out[i] = total / den if members and den != 0 else 0.0
    return out.reshape(shape)


def linear(experts, weights, normalize=True) -> np.ndarray:
    total = sum(w * f64(e) for w, e in zip(weights, experts, strict=True))
    return total / sum(weights) if normalize else total


def task_arithmetic(base, experts, weights, lam=1.0) -> np.ndarray:
    taus = task_vectors(base, experts)
    return f64(base) + lam * sum(w * t for w, t in zip(weights, taus, strict=True))


def ties(base, experts, weights, densities, lam=1.0, merge="mean") -> np.ndarray:
    taus = task_vectors(base, experts)
    trimmed = [trim(t, d) for t, d in zip(taus, densities, strict=True)]
    return f64(base) + lam * ties_merge(trimmed, weights, merge)


def model_topk_masks(tensors: list[np.ndarray], density: float) -> list[np.ndarray]:
    """Model-wide top-k of one expert over several tensors: ties by (tensor order, flat index)."""
    flat = np.concatenate([f64(t).ravel() for t in tensors])
    keep = topk_mask(flat, keep_count(density, flat.size))
    out, start = [], 0
    for t in tensors:
        size = np.size(t)
        out.append(keep[start : start + size].reshape(np.shape(t)))
        start += size
    return out


def model_kth_largest(tensors: list[np.ndarray], density: float) -> float:
    """The model-wide k-th largest |x| (0.0 when k exceeds the non-zero count)."""
    a = np.sort(np.abs(np.concatenate([f64(t).ravel() for t in tensors])))[::-1]
    k = keep_count(density, a.size)
    nonzero = int((a != 0).sum())
    return 0.0 if k >= nonzero else float(a[k - 1])


def dare(tau, density: float, rescale: bool, keep) -> np.ndarray:
    kept = np.where(keep, f64(tau), 0.0)
    return kept / density if rescale else kept


def dare_linear(base, experts, weights, densities, lam, rescale, keeps) -> np.ndarray:
    taus = task_vectors(base, experts)
    dropped = [dare(t, d, rescale, k) for t, d, k in zip(taus, densities, keeps, strict=True)]
    return f64(base) + lam * sum(w * t for w, t in zip(weights, dropped, strict=True))


def dare_ties(base, experts, weights, densities, lam, merge, keeps) -> np.ndarray:
    taus = task_vectors(base, experts)
    dropped = [dare(t, d, True, k) for t, d, k in zip(taus, densities, keeps, strict=True)]
    return f64(base) + lam * ties_merge(dropped, weights, merge)


def mtl(taus: list[np.ndarray], base_merge: str) -> np.ndarray:
    if base_merge == "task_arithmetic":
        return sum(taus)
    return ties_merge([trim(t, 0.2) for t in taus], [1.0] * len(taus), "sum")


def tall(base, experts, weights, lambdas, base_merge="task_arithmetic"):
    """(tau_MTL, masks (T, *shape)) with tau_t = w_t (theta_t - theta0)."""
    taus = [w * t for w, t in zip(weights, task_vectors(base, experts), strict=True)]
    vec = mtl(taus, base_merge)
    masks = np.stack([np.abs(t) > lam * np.abs(vec - t) for t, lam in zip(taus, lambdas, strict=True)])
    return vec, masks


def tall_margins(base, experts, weights, lambdas, base_merge="task_arithmetic", scales=None):
    """|tau_t| - lambda_t |tau - tau_t| per task and its scale: where a float32 mask may flip."""
    taus = [w * t for w, t in zip(weights, task_vectors(base, experts), strict=True)]
    if scales is not None:
        taus = [s * t for s, t in zip(scales, taus, strict=True)]
    vec = mtl(taus, base_merge)
    margin = np.stack([np.abs(t) - lam * np.abs(vec - t) for t, lam in zip(taus, lambdas, strict=True)])
    size = np.stack([np.abs(t) + lam * np.abs(vec - t) for t, lam in zip(taus, lambdas, strict=True)])
    return margin, size


def consensus(base, experts, weights, lambdas, k=2, alpha=1.0, base_merge="task_arithmetic"):
    vec, masks = tall(base, experts, weights, lambdas, base_merge)
    votes = masks.sum(axis=0)
    return f64(base) + alpha * np.where(votes >= k, vec, 0.0)


def scaling(
    base, experts, weights, lambdas, stat="absmax", q=0.99, rho=None, s_max=1e4, base_merge="task_arithmetic"
):
    """(tau', masks (T, *shape), scales (T,))."""
    taus = [w * t for w, t in zip(weights, task_vectors(base, experts), strict=True)]
    if stat == "absmax":
        r = [float(np.max(np.abs(t))) for t in taus]
    else:
        r = [float(np.quantile(np.abs(t), q)) for t in taus]
    r_star = max(r)
    scales = []
    for r_t in r:
        if r_t > 0 and (rho is None or r_t < rho * r_star):
            scales.append(float(np.clip(r_star / r_t, 1.0, s_max)))
        else:
            scales.append(1.0)
    scaled = [s * t for s, t in zip(scales, taus, strict=True)]
    vec = mtl(scaled, base_merge)
    masks = np.stack([np.abs(t) > lam * np.abs(vec - t) for t, lam in zip(scaled, lambdas, strict=True)])
    return vec, masks, np.array(scales)


def cabs_masks(taus: list[np.ndarray], n: int, m: int, order: list[int]) -> list[np.ndarray]:
    """Block by block, expert by expert: the n largest |tau| among free non-zero positions."""
    size = taus[0].size
    taken = np.zeros(size, dtype=bool)
    masks = [np.zeros(size, dtype=bool) for _ in taus]
    for t in order:
        flat = taus[t].ravel()
        for start in range(0, size, m):
            block = range(start, min(start + m, size))
            quota = math.ceil(Fraction(n * len(block), m))
            free = [i for i in block if not taken[i] and flat[i] != 0]
            free.sort(key=lambda i: (-abs(flat[i]), i))
            for i in free[:quota]:
                masks[t][i] = True
        taken |= masks[t]
    return [mk.reshape(taus[0].shape) for mk in masks]


def cabs(base, experts, weights, n, m, lam=1.0, order=None) -> np.ndarray:
    taus = task_vectors(base, experts)
    order = list(range(len(taus))) if order is None else order
    masks = cabs_masks(taus, n, m, order)
    return f64(base) + lam * sum(
        w * np.where(mk, t, 0.0) for w, mk, t in zip(weights, masks, taus, strict=True)
    )

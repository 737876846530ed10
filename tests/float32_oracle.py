"""The float32 merge methods as sefusion computed them before the engine streamed chunks (0.1.0's
whole-tensor code, torch.where masks), kept as an oracle: the streaming engine must give the same bits.

Unlike tests/reference.py (float64, within a rounding step) this pins the exact float32 operations:
the same subtractions, fused multiply-adds (add_ with alpha) and reductions, in the same order. It
reuses the library's blocks that streaming did not change (exact top-k masks by kthvalue, sign
election, CABS masks, task vectors) and spells out the ones it did (trims, disjoint merge, DARE,
masked selections).
"""

from __future__ import annotations

import torch

from sefusion.methods._ops import (
    MTL_TIES_DENSITY,
    BundleTensor,
    apply,
    cabs_masks,
    dare_seed,
    elect_sign,
    keep_count,
    per_expert,
    quantile_abs,
    resolve_order,
    task_vectors,
    topk_mask,
)


def trim_each(taus, densities):
    zero = torch.zeros((), dtype=taus.dtype)
    out = torch.empty_like(taus)
    for tau, d, row in zip(taus, densities, out, strict=True):
        torch.where(topk_mask(tau, keep_count(d, tau.numel())), tau, zero, out=row)
    return out


def trim_model_scope(taus, thresholds):
    out = []
    for tau, thr in zip(taus, thresholds, strict=True):
        a = tau.abs()
        keep = a > thr.value
        if thr.equal_left > 0:
            equal = (a == thr.value) & (a != 0)
            take = thr.take_equal(int(equal.sum()))
            keep = keep | (equal & (equal.cumsum(0) <= take))
        out.append(torch.where(keep, tau, 0.0))
    return torch.stack(out)


def disjoint_merge(trimmed, weights, sign, merge):
    w = [float(v) for v in weights]
    total = torch.zeros_like(sign)
    den = torch.zeros_like(sign) if merge == "mean" else None
    agree = torch.empty(sign.shape, dtype=torch.bool)
    for t, row in enumerate(trimmed):
        torch.gt(row * sign, 0, out=agree)
        total.add_(torch.where(agree, row, 0.0), alpha=w[t])
        if den is not None:
            den.add_(agree, alpha=w[t])
    if den is None:
        return total
    return torch.where(den != 0, total / den, 0.0)


def ties_merge(trimmed, weights, merge):
    return disjoint_merge(trimmed, weights, elect_sign(trimmed, weights), merge)


def dare(x, density, rescale, seed):
    if density == 1:
        return x
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(x.shape, generator=gen) < density
    kept = torch.where(keep, x, 0.0)
    return kept / density if rescale else kept


def mtl_vector(taus, base_merge):
    if base_merge == "task_arithmetic":
        return taus.sum(0)
    return ties_merge(trim_each(taus, [MTL_TIES_DENSITY] * taus.shape[0]), torch.ones(taus.shape[0]), "sum")


def tall_masks_of(taus, tau_mtl, lambdas):
    lam = torch.as_tensor(lambdas, dtype=torch.float32)[:, None]
    return taus.abs() > lam * (tau_mtl - taus).abs()


def range_stat(x, stat, q):
    if x.numel() == 0:
        return 0.0
    return float(x.abs().max()) if stat == "absmax" else quantile_abs(x, q)


# --------------------------------------------------------------------------- the methods


def linear(base, experts, weights, *, normalize=True, **_):
    merged = torch.zeros(experts[0].shape, dtype=torch.float32)
    for w, e in zip(weights, experts, strict=True):
        merged.add_(e, alpha=float(w))
    return merged.div_(sum(weights)) if normalize else merged


def task_arithmetic(base, experts, weights, *, lambda_=1.0, **_):
    taus, w = task_vectors(base, experts, weights, "task_arithmetic")
    total = torch.zeros_like(taus[0])
    for t, tau in enumerate(taus):
        total.add_(tau, alpha=float(w[t]))
    return apply(base, total.mul_(lambda_))


def ties(base, experts, weights, *, density=0.2, lambda_=1.0, merge="mean", thresholds=None, **_):
    taus, w = task_vectors(base, experts, weights, "ties")
    if thresholds is not None:
        trimmed = trim_model_scope(taus, thresholds)
    else:
        trimmed = trim_each(taus, per_expert(density, len(experts), "density"))
    return apply(base, lambda_ * ties_merge(trimmed, w, merge))


def _dare_all(taus, density, rescale, seed, name):
    densities = per_expert(density, taus.shape[0], "density")
    return torch.stack(
        [
            dare(tau, d, rescale, dare_seed(seed, name, t))
            for t, (tau, d) in enumerate(zip(taus, densities, strict=True))
        ]
    )


def dare_linear(base, experts, weights, *, density=0.5, lambda_=1.0, rescale=True, seed=0, name="", **_):
    taus, w = task_vectors(base, experts, weights, "dare_linear")
    return apply(base, lambda_ * (w[:, None] * _dare_all(taus, density, rescale, seed, name)).sum(0))


def dare_ties(base, experts, weights, *, density=0.5, lambda_=1.0, merge="mean", seed=0, name="", **_):
    taus, w = task_vectors(base, experts, weights, "dare_ties")
    return apply(base, lambda_ * ties_merge(_dare_all(taus, density, True, seed, name), w, merge))


def consensus(base, experts, weights, *, lambdas, k=2, alpha=1.0, base_merge="task_arithmetic", **_):
    taus, w = task_vectors(base, experts, weights, "consensus")
    taus = taus * w[:, None]
    mtl = mtl_vector(taus, base_merge)
    votes = tall_masks_of(taus, mtl, lambdas).sum(0)
    return apply(base, alpha * torch.where(votes >= k, mtl, 0.0))


def cabs(base, experts, weights, *, n=16, m=64, lambda_=1.0, order=None, task_names=(), **_):
    taus, w = task_vectors(base, experts, weights, "cabs")
    masks = cabs_masks(taus, n, m, resolve_order(order, list(task_names)))
    return apply(base, lambda_ * (w[:, None] * torch.where(masks, taus, 0.0)).sum(0))


def tall_masks(base, experts, weights, *, lambdas, base_merge="task_arithmetic", **_):
    taus, w = task_vectors(base, experts, weights, "tall_masks")
    taus = taus * w[:, None]
    mtl = mtl_vector(taus, base_merge)
    masks = tall_masks_of(taus, mtl, lambdas)
    return BundleTensor(mtl.reshape(base.shape), masks.reshape(len(experts), *base.shape), None)


def scaling_masks(
    base,
    experts,
    weights,
    *,
    lambdas,
    stat="absmax",
    q=0.99,
    rho=None,
    s_max=1e4,
    base_merge="task_arithmetic",
    **_,
):
    taus, w = task_vectors(base, experts, weights, "scaling_masks")
    taus = taus * w[:, None]
    r = [range_stat(tau, stat, q) for tau in taus]
    r_star = max(r)
    s = [
        min(max(r_star / r_t, 1.0), s_max) if r_t > 0 and (rho is None or r_t < rho * r_star) else 1.0
        for r_t in r
    ]
    scales = torch.tensor(s, dtype=torch.float32)
    scaled = taus * scales[:, None]
    vector = mtl_vector(scaled, base_merge)
    masks = tall_masks_of(scaled, vector, lambdas)
    return BundleTensor(vector.reshape(base.shape), masks.reshape(len(experts), *base.shape), scales)


METHODS = {
    f.__name__: f
    for f in (
        linear,
        task_arithmetic,
        ties,
        dare_linear,
        dare_ties,
        consensus,
        cabs,
        tall_masks,
        scaling_masks,
    )
}

"""The papers' building blocks shared by the methods, named like the papers.

Task vectors tau_t = theta_t - theta0; `trim` (top-k by magnitude), `elect_sign` and `disjoint_merge`
(TIES), `dare` (DARE), `mtl_vector` and `tall_masks_of` (TALL-Masks), `range_stat` (Scaling-Masks),
`balanced_mask` and `cabs_masks` (CABS n:m). The exact selections they rest on (the k-th largest of a
tensor, of a streamed tensor, of a whole model) live in `_select`; parameter types and the tensor
context in `_context`. Both are re-exported here.

Every block works on flattened tensors, task vectors stacked as (T, n), so that any shape (0-d
included) takes the same path; the methods reshape at the end. Selection (kthvalue), never a sort.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._lazy import torch
from ._context import (  # noqa: F401  (the method files import these from here)
    DEFAULT_CTX,
    DEFAULT_LAMBDA,
    MTL_TIES_DENSITY,
    BaseMerge,
    BundleTensor,
    Density,
    DensityScope,
    Lambdas,
    Merge,
    ModelThreshold,
    NonNegInt,
    PosInt,
    ScaleCap,
    Share,
    Stat,
    TaskLambda,
    TensorContext,
    WholeTensorStat,
    check_choice,
    check_density,
    dare_seed,
    per_expert,
)
from ._select import (  # noqa: F401  (the selection engines, used by the blocks below and the tests)
    _BAND_CAP,
    _HI_BINS,
    _INT32_MAX,
    _LO_BINS,
    _NP_SAMPLE,
    _SAMPLE,
    _SAMPLE_CHUNKS,
    _SAMPLE_STEP,
    ModelTopK,
    RangeStat,
    TensorTopK,
    _abs_bits,
    _kth_bin,
    _kth_largest_np,
    _low_half_counts,
    _RadixSelect,
    _take_first,
    _take_first_flat,
    keep_count,
    kth_largest,
    model_thresholds,
    quantile_abs,
    range_stat,
    range_stats,
    tensor_thresholds,
    topk_mask,
)

if TYPE_CHECKING:
    from torch import Tensor


# --------------------------------------------------------------------------- inputs and parameters


def task_vectors(base: Tensor | None, experts: list[Tensor], weights: list[float], method: str):
    """tau_t = theta_t - theta0, flattened and stacked: returns (taus (T, n), w (T,)) in float32."""
    if base is None:
        raise ValueError(f"method '{method}' needs a base model (task vectors are theta_t - theta0)")
    check_experts(experts, weights, method, base.shape)
    flat = base.reshape(-1)
    taus = torch.empty((len(experts), flat.numel()), dtype=torch.float32, device=base.device)  # (T, n)
    for t, e in enumerate(experts):  # one pass per expert, no stacked copy
        torch.sub(e.reshape(-1), flat, out=taus[t])
    return taus, weight_tensor(weights, taus)


def check_experts(experts: list[Tensor], weights: list[float], method: str, shape: Any = None) -> None:
    if not experts:
        raise ValueError(f"method '{method}' needs at least one expert")
    if len(weights) != len(experts):
        raise ValueError(f"method '{method}': {len(weights)} weights for {len(experts)} experts")
    shape = experts[0].shape if shape is None else shape
    for i, e in enumerate(experts):
        if e.shape != shape:
            raise ValueError(
                f"method '{method}': expert {i} has shape {tuple(e.shape)}, expected {tuple(shape)}"
            )


def weight_tensor(weights: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(weights, dtype=torch.float32, device=like.device)


def apply(base: Tensor, delta: Tensor) -> Tensor:
    """theta0 + delta, delta flat (n,), in the base's shape."""
    return base + delta.reshape(base.shape)


def task_names(ctx: TensorContext, count: int) -> tuple[str, ...]:
    """The experts' task names from the engine; "0", "1", ... when the function is called directly."""
    if not ctx.task_names:
        return tuple(str(i) for i in range(count))
    if len(ctx.task_names) != count:
        raise ValueError(f"{len(ctx.task_names)} task names {list(ctx.task_names)} for {count} experts")
    return ctx.task_names


def resolve_per_task(
    value: float | Sequence[float] | Mapping[str, float],
    task_names: Sequence[str],
    what: str,
    default: float | None = None,
) -> list[float]:
    """One value per task (recipe order) from a scalar, a list in recipe order, or a {task: value} map.

    A map may leave tasks out when `default` is given (they take it). An unknown task name is an
    error that names it and lists the known ones.
    """
    names = list(task_names)
    known = ", ".join(names) or "(none)"
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"{what}: unknown task name(s) {', '.join(map(repr, unknown))}; tasks: {known}")
        missing = [n for n in names if n not in value]
        if missing and default is None:
            raise ValueError(f"{what}: no value for task(s) {', '.join(map(repr, missing))}")
        return [float(value.get(n, default)) for n in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{what}: {len(value)} values for {len(names)} tasks ({known})")
        return [float(v) for v in value]
    return [float(value)] * len(names)


def bind_lambdas(kwargs: dict[str, Any], task_names: list[str]) -> None:
    """`lambdas` (a scalar, a list in recipe order or a {task: value} map) as one value per task."""
    kwargs["lambdas"] = resolve_per_task(kwargs["lambdas"], task_names, "lambdas", default=DEFAULT_LAMBDA)


def resolve_order(order: Sequence[str] | None, task_names: Sequence[str]) -> list[int]:
    """Task names in processing order -> expert indices; None is recipe order. Must name every task once."""
    names = list(task_names)
    if order is None:
        return list(range(len(names)))
    unknown = [o for o in order if o not in names]
    if unknown:
        raise ValueError(
            f"order: unknown task name(s) {', '.join(map(repr, unknown))}; tasks: {', '.join(names) or '(none)'}"
        )
    if sorted(order) != sorted(names):
        raise ValueError(
            f"order must name every task exactly once; got {list(order)}, tasks: {', '.join(names)}"
        )
    return [names.index(o) for o in order]


def trim(x: Tensor, density: float) -> Tensor:
    """TIES trim: x with all but its top ceil(density * n) magnitudes set to 0."""
    check_density(density)
    return torch.where(topk_mask(x, keep_count(density, x.numel())), x, 0.0)


def trim_each(taus: Tensor, densities: Sequence[float], ctx: TensorContext = DEFAULT_CTX) -> Tensor:
    """(T, n) -> (T, n): row t keeps the top ceil(densities[t] * N) magnitudes of the whole tensor (N
    entries), exactly k with ties by flat index; `taus` may be one chunk of it (see TensorContext)."""
    for d in densities:
        check_density(d)
    return trim_by(taus, ctx.whole_tensor(TensorTopK(taus.shape[0], list(densities)), taus))


def trim_model_scope(taus: Tensor, thresholds: list[ModelThreshold] | None) -> Tensor:
    """(T, n) -> (T, n): trim row t with the model-wide threshold of expert t (consumes its ties)."""
    if thresholds is None:
        raise ValueError(
            "density_scope 'model' needs the model-wide thresholds (ctx.model_thresholds), found in a pass "
            "over the whole model before merging (sefusion.methods._ops.model_thresholds); the merge "
            "engine runs it, a direct call must pass them"
        )
    if len(thresholds) != taus.shape[0]:
        raise ValueError(f"{len(thresholds)} model thresholds for {taus.shape[0]} experts")
    return trim_by(taus, thresholds)


def _below(value: float) -> float:
    """The largest float32 below a positive float32 `value`: |x| > _below(v) is |x| >= v."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def trim_by(taus: Tensor, thresholds: Sequence[ModelThreshold]) -> Tensor:
    """(T, n) -> (T, n): row t keeps |x| > thresholds[t].value, then entries equal to it in flat order
    while its tie budget lasts (consumed here, so consecutive chunks of a tensor continue it).

    hardshrink(x, v) is where(|x| > v, x, 0) for finite x, vectorized (torch.where is a scalar loop).
    """
    out = torch.empty_like(taus)
    for tau, thr, row in zip(taus, thresholds, out, strict=True):
        v = thr.value
        if thr.equal_left == 0 or v == 0:  # zeros are never kept
            torch.ops.aten.hardshrink.out(tau, v, out=row)
            continue
        if thr.equal_all:  # every tie is kept: nothing to count
            torch.ops.aten.hardshrink.out(tau, _below(v), out=row)
            continue
        a = tau.abs()
        equal = int(torch.eq(a, v, out=torch.empty_like(a)).sum())  # float 0/1: a vectorized count
        if equal <= thr.equal_left:  # every tie in this chunk fits: keep |x| >= v
            thr.take_equal(equal)
            torch.ops.aten.hardshrink.out(tau, _below(v), out=row)
            continue
        keep = a > v  # the budget runs out in this chunk: the first equal_left ties, by index
        keep[(a == v).nonzero().reshape(-1)[: thr.take_equal(equal)]] = True
        torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device), out=row)
    return out


# --------------------------------------------------------------------------- TIES elect + merge


def elect_sign(trimmed: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """gamma = sign(sum_t w_t tau_hat_t); trimmed (T, n) -> (n,), 0 where the sum is 0."""
    w = [float(v) for v in weights]
    total = torch.zeros_like(trimmed[0])
    for t, row in enumerate(trimmed):  # row by row: no (T, n) temporaries
        total.add_(row, alpha=w[t])
    return total.sign_()


def disjoint_merge(trimmed: Tensor, weights: Sequence[float] | Tensor, sign: Tensor, merge: str) -> Tensor:
    """TIES disjoint merge over A = {t : tau_hat_t != 0, sign tau_hat_t = gamma}; (T, n) -> (n,).

    mean: sum_A w_t tau_hat_t / sum_A w_t (0 where A is empty); sum: sum_A w_t tau_hat_t.
    """
    check_choice(merge, ("mean", "sum"), "merge")
    w = [float(v) for v in weights]
    total = torch.zeros_like(sign)
    den = torch.zeros_like(sign) if merge == "mean" else None
    agree = torch.empty_like(sign)  # float 0/1 masks: torch's bool kernels are scalar loops
    member = torch.empty_like(sign)
    for t, row in enumerate(trimmed):  # row by row, in place: no (T, n) temporaries
        torch.gt(
            torch.mul(row, sign, out=agree), 0, out=agree
        )  # non-zero, of the elected sign (gamma 0: none)
        # row * agree is row or a signed zero, and a sum that starts at +0 is the same with +0 or -0 added
        total.add_(torch.mul(row, agree, out=member), alpha=w[t])
        if den is not None:
            den.add_(agree, alpha=w[t])
    if den is None:
        return total
    if all(v > 0 for v in w):  # den is 0 exactly where A is empty, and there total is +0: divide by 1
        return total.div_(den.add_(torch.eq(den, 0, out=agree)))
    return torch.where(den != 0, total / den, 0.0)


def ties_merge(trimmed: Tensor, weights: Sequence[float] | Tensor, merge: str) -> Tensor:
    """Elect + disjoint merge of already trimmed (or DARE'd) task vectors: (T, n) -> tau_m (n,)."""
    return disjoint_merge(trimmed, weights, elect_sign(trimmed, weights), merge)


# --------------------------------------------------------------------------- DARE


def dare(x: Tensor, density: float, rescale: bool = True, seed: int = 0, *, generator: Any = None) -> Tensor:
    """DARE(x) = x * b / density, b ~ Bernoulli(density) (rescale false: x * b). density 1 is the identity.

    b is drawn on the CPU (one uniform draw per entry, in flat order) from `generator`, or from a
    generator seeded with `seed` (see `dare_seed`), so it is the same bits on any device and in any
    chunking that continues the same generator.
    """
    check_density(density)
    if density == 1:
        return x
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    draws = torch.rand(x.shape, generator=gen)
    kept = keep_where(torch.lt(draws, density, out=draws).to(x.device), x)
    return kept / density if rescale else kept


def keep_where(mask: Tensor, x: Tensor) -> Tensor:
    """torch.where(mask, x, 0) for a float 0/1 `mask` and finite x, vectorized: x * mask, plus 0 so that
    dropped negative entries read +0 (a kept -0 entry reads +0 too, which no sum tells apart)."""
    return torch.mul(x, mask).add_(0.0)


# --------------------------------------------------------------------------- TALL-Masks


def mtl_vector(taus: Tensor, base_merge: str, ctx: TensorContext = DEFAULT_CTX) -> Tensor:
    """tau_MTL of (weighted) task vectors (T, n) -> (n,): their sum, or TIES (density 0.2, sum, lambda 1)."""
    check_choice(base_merge, ("task_arithmetic", "ties"), "base_merge")
    if base_merge == "task_arithmetic":
        return taus.sum(0)
    ones = torch.ones(taus.shape[0])
    return ties_merge(trim_each(taus, [MTL_TIES_DENSITY] * taus.shape[0], ctx), ones, "sum")


def tall_mask(tau_t: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """m_t = 1[ |tau_t| > lambda_t * |tau_MTL - tau_t| ] (strict)."""
    return tau_t.abs() > lam * (tau_mtl - tau_t).abs()


def tall_masks_of(taus: Tensor, tau_mtl: Tensor, lambdas: Sequence[float], dtype: Any = None) -> Tensor:
    """Every task's TALL mask at once: (T, n), (n,) -> (T, n), bool (or float 0/1 with dtype float32)."""
    lam = weight_tensor(lambdas, taus)[:, None]
    bound = torch.sub(tau_mtl, taus).abs_().mul_(lam)  # lambda_t |tau_MTL - tau_t|
    size = taus.abs()
    if dtype in (None, torch.bool) and taus.device.type == "cpu":  # numpy's bool compare is vectorized
        return torch.from_numpy(np.greater(size.numpy(), bound.numpy()))
    return torch.gt(size, bound, out=torch.empty(taus.shape, dtype=dtype or torch.bool, device=taus.device))


# --------------------------------------------------------------------------- CABS n:m


def _rowwise_top(score: Tensor, q: int) -> Tensor:
    """Per row of score (B, w), the q largest entries >= 0 (-1 marks ineligible), ties by lower index."""
    eligible = score >= 0
    width = score.shape[-1]
    if q >= width:
        return eligible
    kth = torch.kthvalue(score, width - q + 1, dim=-1, keepdim=True).values  # (B, 1), q-th largest
    return _take_first(score > kth, (score == kth) & eligible, q)


def balanced_mask(x: Tensor, n: int, m: int, taken: Tensor | None = None) -> Tensor:
    """CABS n:m mask of flat x: in every block of m entries the n largest |x| among free positions.

    Ties by lower index; a trailing block of length L < m keeps ceil(n*L/m); positions in `taken`
    (bool, like x) are never chosen, and a block with fewer free positions gives all it has. Zeros are
    not taken: they add nothing to this expert and would block later ones.
    """
    if n > m:
        raise ValueError(f"n ({n}) must be <= m ({m})")
    size = x.numel()
    free = x != 0 if taken is None else (x != 0) & ~taken
    score = torch.where(free, x.abs(), -1.0)
    full = size // m * m
    mask = torch.zeros(size, dtype=torch.bool, device=x.device)
    if full:
        mask[:full] = _rowwise_top(score[:full].reshape(-1, m), n).reshape(-1)
    if full < size:
        tail = size - full
        mask[full:] = _rowwise_top(score[full:].reshape(1, tail), -(-n * tail // m)).reshape(-1)
    return mask


def cabs_masks(taus: Tensor, n: int, m: int, order: Sequence[int]) -> Tensor:
    """Conflict-aware balanced masks (T, n_entries): experts in `order`, each on positions still free."""
    taken = torch.zeros(taus.shape[1], dtype=torch.bool, device=taus.device)
    masks = torch.zeros(taus.shape, dtype=torch.bool, device=taus.device)
    for t in order:
        masks[t] = balanced_mask(taus[t], n, m, taken)
        taken |= masks[t]
    return masks

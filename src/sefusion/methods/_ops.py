"""Building blocks shared by the methods (METHODS.md, "Notation and shared rules").

Named like the papers: `trim` / `topk_mask` (top-k by magnitude), `elect_sign` and `disjoint_merge`
(TIES), `dare` (DARE), `tall_masks_of` (TALL-Masks), `balanced_mask` (CABS n:m), plus the exact
model-wide threshold of TIES `density_scope: model` (`ModelTopK`, `model_thresholds`).

Every block works on flattened tensors, task vectors stacked as (T, n), so that any shape (0-d
included) takes the same path; the methods reshape at the end. Selection (kthvalue), never a sort.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import numpy as np
from annotated_types import Ge, Gt, Le

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

# Parameter types. registry.register evaluates the methods' (string) annotations in the method
# module's globals, so every alias is a module-level name that the method files import. The
# constraints are annotated-types markers, which pydantic enforces like Field(gt=...) and which print
# readably in `sefusion methods` ("float Gt(gt=0) Le(le=1)").
Density = Annotated[float, Gt(0), Le(1)]
Share = Annotated[float, Gt(0), Le(1)]  # q, rho
TaskLambda = Annotated[float, Ge(0)]
Lambdas = TaskLambda | list[TaskLambda] | dict[str, TaskLambda]
NonNegInt = Annotated[int, Ge(0)]
PosInt = Annotated[int, Ge(1)]
ScaleCap = Annotated[float, Ge(1)]
Merge = Literal["mean", "sum"]
BaseMerge = Literal["task_arithmetic", "ties"]
DensityScope = Literal["tensor", "model"]
Stat = Literal["absmax", "quantile"]

DEFAULT_LAMBDA = 0.4  # TALL-Masks / Consensus / Scaling-Masks lambda_t for a task a map leaves out
MTL_TIES_DENSITY = 0.2  # base_merge: ties


@dataclass
class ModelThreshold:
    """Model-wide top-k threshold of one expert (TIES `density_scope: model`).

    Keep every |x| > `value`; of the entries with |x| == `value` (non-zero), keep the first
    `equal_left` in (tensor name, flat index) order. The engine gives each tensor its own share of the
    budget (`tensor_thresholds`); `take_equal` consumes it across that tensor's chunks.
    """

    value: float
    equal_left: int
    # every entry equal to `value` in the scope is kept (the budget is their count): trimming keeps
    # |x| >= value without counting ties chunk by chunk
    equal_all: bool = field(default=False, compare=False)

    def copy(self) -> ModelThreshold:
        return ModelThreshold(self.value, self.equal_left, self.equal_all)

    def take_equal(self, available: int) -> int:
        """Take up to `available` of the remaining ties (this tensor's count); returns how many."""
        take = min(available, self.equal_left)
        self.equal_left -= take
        return take


class WholeTensorStat(Protocol):
    """A quantity of the whole tensor that a method needs before it can merge any part of it (the exact
    k-th largest |tau_t| of TIES, Scaling-Masks' range): fed every part of the tensor in one or more
    passes, then read."""

    done: bool  # every pass has been fed

    def update(self, x: Tensor) -> None: ...  # one part of the data, (rows, n) or a list of rows

    def end_pass(self) -> None: ...

    def result(self) -> Any: ...  # a fresh result each call (tie budgets are consumed as they are used)


@dataclass(frozen=True)
class TensorContext:
    """What the engine knows about the tensor being merged; not a recipe parameter.

    A method sees the tensor's entries as flat (n,) parts: the whole tensor when it is called directly,
    chunks of its flat row-major range when the engine streams it. Quantities of the whole tensor come
    from `whole_tensor`; DARE's random stream from `dare_generator`. Both give the same bits either way.
    """

    name: str = ""
    seed: int = 0
    task_names: tuple[str, ...] = ()
    model_thresholds: list[ModelThreshold] | None = field(default=None, compare=False)

    def whole_tensor(self, stat: WholeTensorStat, x: Tensor) -> Any:
        """`stat` of the whole tensor, of which `x` is the part in hand: here all of it, so every pass is
        fed at once. The streaming engine's context feeds it chunk by chunk, in passes before the merge."""
        while not stat.done:
            stat.update(x)
            stat.end_pass()
        return stat.result()

    def dare_generator(self, expert_index: int) -> Any:
        """The CPU generator of DARE's keep-draws for expert `expert_index` (see `dare_seed`); the
        streaming engine hands out one per expert and tensor that runs on across the tensor's chunks."""
        return torch.Generator().manual_seed(dare_seed(self.seed, self.name, expert_index))


DEFAULT_CTX = TensorContext()


@dataclass(frozen=True)
class BundleTensor:
    """One tensor of a bundle: the merged vector (tau_MTL or tau'), per-task masks, per-task scales.

    Task t's tensor is theta0 + (masks[t] * vector) / scales[t]  (scales None means all 1).
    vector: float32, the tensor's shape. masks: bool, (T, *shape). scales: float32 (T,) or None.
    """

    vector: Tensor
    masks: Tensor
    scales: Tensor | None = None


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


def per_expert(value: float | Sequence[float], count: int, what: str) -> list[float]:
    """A per-expert parameter as one value per expert (a scalar is broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: {len(value)} values for {count} experts")
        return [float(v) for v in value]
    return [float(value)] * count


def check_density(density: float, what: str = "density") -> None:
    if not 0 < density <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {density}")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


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


# --------------------------------------------------------------------------- top-k by magnitude


def keep_count(density: float, n: int) -> int:
    """k = ceil(density * n), density read as the decimal it is written as.

    The float product rounds (0.07 * 100 == 7.000000000000001, whose ceil is 8); the shortest decimal
    that round-trips the float (repr) is what a recipe says, so k is exact: ceil(7/100 * 100) = 7.
    """
    return math.ceil(Fraction(repr(float(density))) * n)


def _take_first(keep: Tensor, equal: Tensor, quota: Any) -> Tensor:
    """keep | the first (quota - count(keep)) entries of `equal` along the last dim, lowest index first."""
    need = quota - keep.sum(-1, keepdim=True)
    return keep | (equal & (equal.cumsum(-1) <= need))


def _take_first_flat(keep: Tensor, equal: Tensor, need: int) -> Tensor:
    """keep | the first `need` True entries of flat `equal` (in place on keep); no cumsum over n."""
    if need > 0:
        idx = equal.nonzero().reshape(-1)[:need]  # positions in flat order
        keep[idx] = True
    return keep


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Exact top-k by magnitude: exactly min(k, nnz) entries, ties by lowest flat index, zeros never.

    Every |x| above the k-th largest |x|, then entries equal to it in flat (row-major) order.
    """
    a = x.reshape(-1).abs()
    n = a.numel()
    if k >= n:
        return (a != 0).reshape(x.shape)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    kth = kth_largest(a, k)
    keep = a > kth
    if float(kth) == 0:  # zeros are never kept: fewer than k non-zero entries
        return keep.reshape(x.shape)
    equal = a == kth
    need = k - int(keep.sum())
    if int(equal.sum()) > need:  # more ties than room: lowest indices first
        return _take_first_flat(keep, equal, need).reshape(x.shape)
    return keep.logical_or_(equal).reshape(x.shape)


_SAMPLE = 1 << 16  # entries sampled to bracket the k-th largest


def kth_largest(a: Tensor, k: int) -> Tensor:
    """The k-th largest value of flat `a` (1 <= k <= n), exactly, by selection.

    Large inputs: a strided sample brackets the answer between two values lo <= kth <= hi (a margin
    of several binomial standard deviations around the sample's k-th largest); counting the entries
    above hi and gathering the few in [lo, hi] leaves a small kthvalue. Where the bracket misses (an
    unlucky sample, or many ties) it falls back to kthvalue on the whole input. Either way the value is
    exact; only the time differs (a few cheap passes instead of a selection over n entries).
    """
    n = a.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(a, n - k + 1).values
    step = n // _SAMPLE
    sample = a[::step]  # (s,) strided view: deterministic, no copy of a
    s = sample.numel()
    p = k / n
    margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
    hi_rank = max(1, math.floor(p * s - margin))  # ranks from the top in the sample
    lo_rank = min(s, math.ceil(p * s + margin))
    hi = torch.kthvalue(sample, s - hi_rank + 1).values
    lo = torch.kthvalue(sample, s - lo_rank + 1).values
    above = int((a > hi).sum())  # entries certainly in the top k
    if above < k:
        band = a[(a >= lo) & (a <= hi)]  # (b,) with b << n
        if above + band.numel() >= k:  # the k-th largest lies in [lo, hi]
            need = k - above  # its rank from the top of the band
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(a, n - k + 1).values


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


def dare_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit seed from (recipe seed, tensor name, expert index): independent of order, threads, device."""
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{expert_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


# --------------------------------------------------------------------------- Scaling-Masks range


def quantile_abs(x: Tensor, q: float) -> float:
    """The q-quantile of |x| with numpy's default (linear) interpolation, by selection.

    torch.quantile refuses inputs above 16M elements; two kthvalue calls do not.
    """
    a = x.reshape(-1).abs()
    n = a.numel()
    if n == 0:
        return 0.0
    h = (n - 1) * q
    lo = math.floor(h)
    v_lo = float(torch.kthvalue(a, lo + 1).values)
    if h == lo:
        return v_lo
    v_hi = float(torch.kthvalue(a, lo + 2).values)
    return v_lo + (h - lo) * (v_hi - v_lo)


def range_stat(x: Tensor, stat: str, q: float) -> float:
    """r = max |x| (absmax) or the q-quantile of |x| (quantile)."""
    check_choice(stat, ("absmax", "quantile"), "stat")
    if x.numel() == 0:
        return 0.0
    return float(x.abs().max()) if stat == "absmax" else quantile_abs(x, q)


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


# --------------------------------------------------------------------------- model-wide threshold

_HI_BINS = 1 << 15  # |x| has sign bit 0: the high 16 bits of its pattern are < 2**15
_LO_BINS = 1 << 16


def _abs_bits(x: Tensor) -> Tensor:
    """Bit patterns of |x| (float32) as int32: for non-negative floats their order is the values' order."""
    return x.detach().reshape(-1).to(torch.float32).abs().contiguous().view(torch.int32)


def _kth_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest (1-based) of a histogram, and the count in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    b = hist.numel() - 1 - i
    return b, int(from_top[i]) - int(hist[b])


class _RadixSelect:
    """Exact k-th largest |x| of each row over every part fed to it, in two passes (radix select).

    Non-negative float32 values order like their bit patterns read as int32, so the k-th largest is
    found 16 bits at a time: pass 1 counts the high halves, pass 2 the low halves of the entries whose
    high half is the chosen one. Memory: a few histograms per row, whatever the data size.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.count = [0] * rows
        self.zeros = [0] * rows
        self._hist: list[Tensor | None] = [None] * rows
        self._picks: list[list[tuple[int, int, int]]] = [[] for _ in range(rows)]  # (k, bin, above)
        self._low: list[dict[int, Tensor]] = [{} for _ in range(rows)]  # bin -> low-half counts

    def feed(self, rows: Sequence[Tensor] | Tensor, first_pass: bool) -> None:
        for r, x in enumerate(rows):
            if not first_pass and not self._picks[r]:
                continue
            bits = _abs_bits(x)
            if first_pass:
                self.count[r] += bits.numel()
                self.zeros[r] += bits.numel() - int(torch.count_nonzero(bits))
                counts = torch.bincount(bits >> 16, minlength=_HI_BINS).cpu()
                self._hist[r] = counts if self._hist[r] is None else self._hist[r].add_(counts)
                continue
            for b in {b for _, b, _ in self._picks[r]}:
                counts = _low_half_counts(bits, b)
                low = self._low[r]
                low[b] = counts if b not in low else low[b].add_(counts)

    def pick(self, ranks: Sequence[Sequence[int]]) -> None:
        """After pass 1: the ranks (1 <= k <= count, from the top) to find in each row."""
        for r, ks in enumerate(ranks):
            hist = self._hist[r] if self._hist[r] is not None else torch.zeros(_HI_BINS, dtype=torch.int64)
            self._picks[r] = [(k, *_kth_bin(hist, k)) for k in ks]
        self._hist = [None] * self.rows

    def found(self) -> list[list[tuple[float, int, int]]]:
        """After pass 2: per row and rank, (k-th largest, entries above it, entries equal to it)."""
        out = []
        for r in range(self.rows):
            row = []
            for k, b, above in self._picks[r]:
                low, above_low = _kth_bin(self._low[r][b], k - above)
                value = struct.unpack("<f", struct.pack("<I", (b << 16) | low))[0]
                row.append((value, above + above_low, int(self._low[r][b][low])))
            out.append(row)
        return out


def _low_half_counts(bits: Tensor, high: int) -> Tensor:
    """Counts of the low 16 bits of the entries of `bits` whose high 16 bits are `high`."""
    if bits.device.type == "cpu":  # numpy's compare and boolean index are vectorized, torch's bool ops not
        b = bits.numpy()
        return torch.from_numpy(np.bincount(b[(b >> 16) == high] & 0xFFFF, minlength=_LO_BINS))
    return torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=_LO_BINS).cpu()


class ModelTopK:
    """Exact k-th largest |tau_t| per expert over a whole tensor or model, in two streaming passes.

    k_t = ceil(density_t * N), N the entries fed per expert; found by radix select (`_RadixSelect`).
    The thresholds keep |tau_t| > value and then `equal_left` entries equal to it, in the order they are
    trimmed (`trim_by`). Used per tensor by `trim_each` (as a TensorContext.whole_tensor statistic) and
    over every mergeable tensor for TIES `density_scope: model`.

    Driving it (the engine)::

        finder = ModelTopK(n_experts, density)
        while not finder.done:
            for name in mergeable_names:             # any order; any chunking of a tensor is fine
                finder.update([tau_1, ..., tau_T])    # this tensor's task vectors, any device
            finder.end_pass()
        ctx_thresholds = finder.thresholds()         # list[ModelThreshold], one per expert

    Each pass must see every entry exactly once, with the same tau values the merge will trim
    (float32 theta_t - theta0, as `task_vectors` computes them).
    """

    PASSES = 2

    def __init__(self, n_experts: int, density: float | Sequence[float]) -> None:
        self.densities = per_expert(density, n_experts, "density")
        for d in self.densities:
            check_density(d)
        self.n_experts = n_experts
        self._pass = 0
        self._select = _RadixSelect(n_experts)
        self._k = [0] * n_experts
        self._result: list[ModelThreshold] | None = None

    @property
    def done(self) -> bool:
        return self._pass >= self.PASSES

    def update(self, taus: Sequence[Tensor] | Tensor) -> None:
        """Count one tensor (or chunk) of every expert's task vector for the current pass."""
        if len(taus) != self.n_experts:
            raise ValueError(f"{len(taus)} task vectors for {self.n_experts} experts")
        if self.done:
            raise ValueError("ModelTopK: both passes are done; call thresholds()")
        self._select.feed(taus, first_pass=self._pass == 0)

    def end_pass(self) -> None:
        """Close the current pass: pick the high bin (pass 1) or the exact threshold (pass 2)."""
        sel = self._select
        if self._pass == 0:
            ranks = []
            for t in range(self.n_experts):
                self._k[t] = keep_count(self.densities[t], sel.count[t])
                keep_all = self._k[t] >= sel.count[t] - sel.zeros[t]  # every non-zero entry
                ranks.append([] if keep_all else [self._k[t]])
            sel.pick(ranks)
        else:
            self._result = [
                ModelThreshold(found[0][0], self._k[t] - found[0][1]) if found else ModelThreshold(0.0, 0)
                for t, found in enumerate(sel.found())
            ]
        self._pass += 1

    def thresholds(self) -> list[ModelThreshold]:
        if self._result is None:
            raise ValueError(f"ModelTopK: {self.PASSES} passes needed, {self._pass} done")
        return self._result

    def result(self) -> list[ModelThreshold]:
        """Fresh copies of the thresholds (trimming consumes their tie budgets)."""
        return [t.copy() for t in self.thresholds()]


_INT32_MAX = 2**31 - 1
_SAMPLE_CHUNKS = 4  # chunks a sample pass reads; a tensor of no more is selected from its first pass
_SAMPLE_STEP = 4  # every 4th entry of a sampled chunk: 256K entries per row
_BAND_CAP = 1 << 22  # entries per row a band may hold before the selection falls back to radix


_NP_SAMPLE = 1 << 14


def _kth_largest_np(a: Any, k: int) -> tuple[int, int]:
    """The k-th largest of a numpy int array (1 <= k <= a.size) and how many entries exceed it, exactly:
    np.partition on the entries of a sampled bracket where that holds the answer (as kth_largest
    does), on the whole array otherwise."""
    n = a.size
    above = 0
    if n > 4 * _NP_SAMPLE:
        sample = np.sort(a[:: n // _NP_SAMPLE])
        s = sample.size
        p = k / n
        margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
        hi = sample[s - max(1, math.floor(p * s - margin))]
        lo = sample[s - min(s, math.ceil(p * s + margin))]
        above = int(np.count_nonzero(a > hi))
        band = a[(a >= lo) & (a <= hi)] if above < k else a[:0]
        if above < k <= above + band.size:
            a, k, n = band, k - above, band.size
        else:
            above = 0
    kth = int(np.partition(a, n - k)[n - k])
    return kth, above + int(np.count_nonzero(a > kth))


class TensorTopK:
    """Exact top-k thresholds of each row of one tensor, k_t = ceil(density_t * n): the ModelThresholds
    that ModelTopK would give, found with less work where the tensor is streamed in chunks.

    A tensor of at most 4 chunks: one pass keeps each row's |x| bit patterns and selects the k-th
    largest among them (np.partition on a sampled bracket). A larger one: a sample pass reads every 4th entry of 4 chunks
    spread over the tensor and brackets the k-th largest, [lo, hi], by 6 binomial standard deviations
    of the sample's rank; one counting pass then counts the entries above hi and keeps those in [lo, hi]
    (the band, about 1% of the tensor), whose (k - above)-th largest is the answer. A row whose bracket
    missed, or whose band outgrew 4M entries (massive ties), falls back to radix selection (ModelTopK):
    two more passes. Bit patterns of non-negative float32 order like the values.
    """

    def __init__(self, rows: int, densities: Sequence[float]) -> None:
        self.rows = rows
        self.densities = per_expert(list(densities), rows, "density")
        self.done = False
        self._phase = "first"  # -> "sample" -> "band" [-> radix] ; "first" decides
        self._chunks: int | None = None
        self._sample: list[list[Tensor]] = [[] for _ in range(rows)]
        self._bracket = [(1, _INT32_MAX)] * rows  # [lo, hi] as bit patterns; lo >= 1: zeros never in a band
        self._n = [0] * rows  # counted in the band pass: entries, zeros, entries above hi
        self._zeros = [0] * rows
        self._above = [0] * rows
        self._band: list[list[Any] | None] = [[] for _ in range(rows)]  # None: outgrew _BAND_CAP
        self._band_size = [0] * rows
        self._radix: ModelTopK | None = None
        self._result: list[ModelThreshold] | None = None
        self._own_bracket = False  # a tensor of few chunks: bracket each row on a sample of its first chunk

    def wants(self, index: int, count: int) -> bool:
        """Whether the current pass reads chunk `index` of `count` (the sample pass reads a few)."""
        if self._chunks is None:
            self._chunks = count
            if self._phase == "first":
                self._phase = "band" if count <= _SAMPLE_CHUNKS else "sample"
                self._own_bracket = self._phase == "band"
        if self._phase != "sample":
            return True
        stride = -(-count // _SAMPLE_CHUNKS)
        return index % stride == 0

    def update(self, x: Sequence[Tensor] | Tensor) -> None:
        if self._phase == "first":  # fed without wants(): a whole tensor in hand
            self._phase = "band"
            self._own_bracket = True
        if self._radix is not None:
            self._radix.update(x)
            return
        for r, row in enumerate(x):
            bits = _abs_bits(row)
            if self._phase == "sample":
                self._sample[r].append(bits[::_SAMPLE_STEP].clone())
            else:
                self._count_band(r, bits)

    def _count_band(self, r: int, bits: Tensor) -> None:
        lo, hi = self._bracket[r]
        b = bits.cpu().numpy()  # numpy: its compares and boolean indexing are vectorized
        if self._own_bracket and self._n[r] == 0 and b.size >= 4 * _NP_SAMPLE:
            # one pass only, so no sample pass: bracket on a strided sample of this first part (a bracket
            # that misses the k-th largest of the whole tensor costs the radix fallback, never exactness)
            step = max(1, b.size // (4 * _NP_SAMPLE))
            self._bracket[r] = self._bracket_of(torch.from_numpy(b[::step].copy()), self.densities[r])
            lo, hi = self._bracket[r]
        self._n[r] += b.size
        self._zeros[r] += b.size - int(np.count_nonzero(b))
        band = self._band[r]
        if (lo, hi) == (1, _INT32_MAX):  # no bracket: keep everything (zeros rank last, below any k-th)
            kept = b
        else:
            self._above[r] += int(np.count_nonzero(b > hi))
            if band is None:
                return
            kept = b[(b >= lo) & (b <= hi)]  # boolean indexing: np.extract goes through nonzero()
        self._band_size[r] += kept.size
        if band is None or self._band_size[r] > _BAND_CAP:
            self._band[r] = None  # massive ties: radix selection instead
        else:
            band.append(kept)

    def end_pass(self) -> None:
        if self._radix is not None:
            self._radix.end_pass()
            if self._radix.done:
                self._result = self._radix.thresholds()
                self.done = True
        elif self._phase == "sample":
            self._bracket = [
                self._bracket_of(torch.cat(rows), d)
                for rows, d in zip(self._sample, self.densities, strict=True)
            ]
            self._sample = []
            self._phase = "band"
        else:
            found = [self._select(r) for r in range(self.rows)]
            if all(f is not None for f in found):
                self._result = found  # type: ignore[assignment]
                self.done = True
            else:
                self._radix = ModelTopK(self.rows, self.densities)
            self._band = []

    @staticmethod
    def _bracket_of(sample: Tensor, density: float) -> tuple[int, int]:
        """Bit patterns [lo, hi] that hold the k-th largest with high probability (as kth_largest)."""
        s = sample.numel()
        if s == 0:
            return 1, _INT32_MAX
        p = density
        margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
        hi_rank = math.floor(p * s - margin)  # ranks from the top of the sample
        lo_rank = math.ceil(p * s + margin)
        ranks = [s - r for r in (hi_rank, lo_rank) if 1 <= r <= s]  # 0-based positions in ascending order
        part = np.partition(sample.numpy(), ranks) if ranks else None
        hi = int(part[s - hi_rank]) if hi_rank >= 1 else _INT32_MAX  # type: ignore[index]
        lo = int(part[s - lo_rank]) if lo_rank <= s else 1  # type: ignore[index]
        return max(lo, 1), hi

    def _select(self, r: int) -> ModelThreshold | None:
        n, zeros, above = self._n[r], self._zeros[r], self._above[r]
        k = keep_count(self.densities[r], n)
        if k >= n - zeros:  # every non-zero entry
            return ModelThreshold(0.0, 0)
        band = self._band[r]
        if band is None or not above < k <= above + self._band_size[r]:
            return None  # the k-th largest is outside the bracket
        values = np.concatenate(band) if len(band) > 1 else band[0]
        kth, greater = _kth_largest_np(values, k - above)  # its rank from the top of the band
        value = struct.unpack("<f", struct.pack("<i", kth))[0]
        left = k - above - greater
        return ModelThreshold(value, left, equal_all=left == int(np.count_nonzero(values == kth)))

    def result(self) -> list[ModelThreshold]:
        if self._result is None:
            raise ValueError("TensorTopK: read before every pass was fed")
        return [t.copy() for t in self._result]


class RangeStat:
    """Scaling-Masks' r_t of every row over the whole tensor: max |x| (one pass) or the q-quantile of
    |x| with numpy's linear interpolation (two passes, the two order statistics by radix select)."""

    def __init__(self, rows: int, stat: str, q: float) -> None:
        check_choice(stat, ("absmax", "quantile"), "stat")
        self.rows, self.stat, self.q = rows, stat, q
        self._passes = 1 if stat == "absmax" else 2
        self._pass = 0
        self._max = [0.0] * rows
        self._select = _RadixSelect(rows)
        self._result: list[float] | None = None

    @property
    def done(self) -> bool:
        return self._pass >= self._passes

    def update(self, x: Sequence[Tensor] | Tensor) -> None:
        if self.stat == "quantile":
            self._select.feed(x, first_pass=self._pass == 0)
            return
        for r, row in enumerate(x):
            if row.numel():
                self._max[r] = max(self._max[r], float(row.abs().max()))

    def end_pass(self) -> None:
        self._pass += 1
        if self.stat == "absmax":
            self._result = list(self._max)
        elif self._pass == 1:
            self._select.pick([self._ranks(n) for n in self._select.count])
        else:
            self._result = [
                self._quantile(n, found)
                for n, found in zip(self._select.count, self._select.found(), strict=True)
            ]

    def _ranks(self, n: int) -> list[int]:
        """The (lo + 1)-th and (lo + 2)-th smallest, as ranks from the top, h = (n - 1) q, lo = floor(h)."""
        if n == 0:
            return []
        h = (n - 1) * self.q
        lo = math.floor(h)
        return [n - lo] if h == lo else [n - lo, n - lo - 1]

    def _quantile(self, n: int, found: list[tuple[float, int, int]]) -> float:
        if n == 0:
            return 0.0
        h = (n - 1) * self.q
        lo = math.floor(h)
        v_lo = found[0][0]
        return v_lo if h == lo else v_lo + (h - lo) * (found[1][0] - v_lo)

    def result(self) -> list[float]:
        if self._result is None:
            raise ValueError("RangeStat: read before every pass was fed")
        return list(self._result)


def range_stats(taus: Tensor, stat: str, q: float, ctx: TensorContext = DEFAULT_CTX) -> list[float]:
    """r_t of every row of (T, n) over the whole tensor (see range_stat); `taus` may be one chunk."""
    return ctx.whole_tensor(RangeStat(taus.shape[0], stat, q), taus)


def model_thresholds(
    passes: Callable[[], Iterable[Sequence[Tensor]]], n_experts: int, density: float | Sequence[float]
) -> list[ModelThreshold]:
    """Exact model-wide top-k thresholds, one per expert, for TIES `density_scope: model`.

    `passes()` is called twice (ModelTopK.PASSES); each call yields, for every mergeable tensor, the
    list of its task vectors tau_1..tau_T. Put the result in TensorContext.model_thresholds and merge
    the tensors in engine order, each once: the threshold objects count down the ties they keep.
    """
    finder = ModelTopK(n_experts, density)
    while not finder.done:
        for taus in passes():
            finder.update(taus)
        finder.end_pass()
    return finder.thresholds()


def tensor_thresholds(
    thresholds: Sequence[ModelThreshold],
    names: Sequence[str],
    tensors: Callable[[], Iterable[tuple[str, Sequence[Tensor]]]],
) -> dict[str, list[ModelThreshold]]:
    """Each tensor's own copy of the model-wide thresholds, with its share of the tie budgets.

    The model-wide rule keeps, of the entries equal to expert t's threshold, the first `equal_left` in
    (tensor name, flat index) order. Handing each tensor its share up front makes the result
    independent of the order in which worker threads merge the tensors. When some expert has ties to
    share, `tensors()` is called once: it yields (name, that tensor's task vectors) for every tensor,
    any chunking, any order; equal entries are counted per tensor and the budgets split in name order.
    """
    names = sorted(names)  # the rule's order: by name, so files, shards and dict order do not matter
    share = [t.equal_left if t.value != 0 else 0 for t in thresholds]
    counts: dict[str, list[int]] = {n: [0] * len(thresholds) for n in names}
    if any(share):
        for name, taus in tensors():
            c = counts[name]
            for t, (tau, thr) in enumerate(zip(taus, thresholds, strict=True)):
                if share[t]:
                    c[t] += int(torch.eq(tau.abs(), thr.value).sum())
    out: dict[str, list[ModelThreshold]] = {}
    for name in names:
        row = []
        for t, thr in enumerate(thresholds):
            take = min(counts[name][t], share[t])
            share[t] -= take
            row.append(ModelThreshold(thr.value, take))
        out[name] = row
    return out

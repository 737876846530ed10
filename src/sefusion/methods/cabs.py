"""`cabs`: conflict-aware balanced sparsification (CABS), then task arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..registry import StudyGrid, register
from ._ops import (
    DEFAULT_CTX,
    PosInt,
    TensorContext,
    apply,
    cabs_masks,
    resolve_order,
    task_names,
    task_vectors,
)

if TYPE_CHECKING:
    from torch import Tensor


def _check(params: dict[str, Any]) -> None:
    if params["n"] > params["m"]:
        raise ValueError(f"n ({params['n']}) must be <= m ({params['m']})")


def _bind_order(kwargs: dict[str, Any], task_names: list[str]) -> None:
    resolve_order(kwargs["order"], task_names)  # every task named once, before any tensor is read


def _grid(nm: tuple[tuple[int, int], ...], lambdas: tuple[float, ...]) -> tuple[dict[str, Any], ...]:
    return tuple({"n": n, "m": m, "lambda": x} for n, m in nm for x in lambdas)


# CABS's masks are disjoint, so each kept entry enters at full weight and lambda only trims the sum:
# three values near the default 1.0 at `full`, the default alone below
_NM = ((1, 4), (2, 8), (8, 32))


@register(
    "cabs", paper="https://arxiv.org/abs/2503.01874", check=_check, stream=True, chunk_align="m",
    bind_tasks=_bind_order,
    study=StudyGrid(
        rank=80, full=_grid(_NM, (0.6, 0.8, 1.0)), quick=_grid(_NM, (1.0,)), small=_grid(((2, 8),), (1.0,))
    ),
)  # fmt: skip
def cabs(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    n: PosInt = 16,
    m: PosInt = 64,
    lambda_: float = 1.0,
    order: list[str] | None = None,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """CABS: each expert keeps n of every m entries, only where no earlier expert kept one.

    Experts in `order` (task names; None: recipe order). mask_t: in each block of m consecutive entries
    of flat tau_t, the n largest |tau_t| among positions no earlier expert took (ties by lower index;
    a trailing block of L < m keeps ceil(n L / m); fewer free positions: all of them; zeros not taken).
    theta = theta0 + lambda * sum_t w_t (mask_t * tau_t).   Yang et al. 2025, https://arxiv.org/abs/2503.01874
    """
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    _check({"n": n, "m": m})
    taus, w = task_vectors(base, experts, weights, "cabs")  # (T, n_entries), (T,)
    masks = cabs_masks(taus, n, m, resolve_order(order, task_names(ctx, len(experts))))
    return apply(base, lambda_ * (w[:, None] * torch.where(masks, taus, 0.0)).sum(0))

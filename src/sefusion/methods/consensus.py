"""`consensus`: keep the entries of tau_MTL that at least k TALL masks select (Consensus merging)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import torch
from ..registry import LAMBDA_FULL, LAMBDA_QUICK, LAMBDA_SMALL, StudyGrid, product, register
from ._ops import (
    DEFAULT_CTX,
    DEFAULT_LAMBDA,
    BaseMerge,
    Lambdas,
    NonNegInt,
    TensorContext,
    apply,
    bind_lambdas,
    keep_where,
    mtl_vector,
    resolve_per_task,
    tall_masks_of,
    task_names,
    task_vectors,
)

if TYPE_CHECKING:
    from torch import Tensor


@register(
    "consensus", paper="https://arxiv.org/abs/2405.07813", stream=True, bind_tasks=bind_lambdas,
    study=StudyGrid(
        rank=50, full=product(alpha=LAMBDA_FULL, k=(2,), lambdas=(0.4,)),
        quick=product(alpha=LAMBDA_QUICK, k=(2,), lambdas=(0.4,)),
        small=product(alpha=LAMBDA_SMALL, k=(2,), lambdas=(0.4,)),
    ),
)  # fmt: skip
def consensus(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    lambdas: Lambdas = DEFAULT_LAMBDA,
    k: NonNegInt = 2,
    alpha: float = 1.0,
    base_merge: BaseMerge = "task_arithmetic",
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """Consensus merging: drop the entries of tau_MTL that fewer than k tasks rely on.

    tau_t = w_t (theta_t - theta0);  tau_MTL = sum_t tau_t  (base_merge ties: TIES, density 0.2, sum)
    m_t = 1[ |tau_t| > lambda_t * |tau_MTL - tau_t| ];  c = 1[ sum_t m_t >= k ]
    theta = theta0 + alpha * (c * tau_MTL)      (k = 0: tau_MTL itself; k > T: theta0)
    Wang et al. 2024, https://arxiv.org/abs/2405.07813
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    taus, w = task_vectors(base, experts, weights, "consensus")
    taus = taus * w[:, None]  # (T, n)
    lam = resolve_per_task(lambdas, task_names(ctx, len(experts)), "lambdas", DEFAULT_LAMBDA)
    mtl = mtl_vector(taus, base_merge, ctx)  # (n,)
    votes = tall_masks_of(taus, mtl, lam, dtype=torch.float32).sum(0)  # (n,) tasks that select each entry
    return apply(base, alpha * keep_where(torch.ge(votes, k, out=votes), mtl))

"""`tall_masks`: a bundle of tau_MTL plus one binary mask per task (TALL-Masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import MASK_LAMBDAS, StudyGrid, product, register
from ._ops import (
    DEFAULT_CTX,
    DEFAULT_LAMBDA,
    BaseMerge,
    BundleTensor,
    Lambdas,
    TensorContext,
    bind_lambdas,
    mtl_vector,
    resolve_per_task,
    tall_masks_of,
    task_names,
    task_vectors,
)

if TYPE_CHECKING:
    from torch import Tensor


@register(
    "tall_masks", paper="https://arxiv.org/abs/2405.07813", kind="bundle", stream=True, bind_tasks=bind_lambdas,
    study=StudyGrid(rank=60, full=product(lambdas=MASK_LAMBDAS), per_task="lambdas"),
)  # fmt: skip
def tall_masks(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    lambdas: Lambdas = DEFAULT_LAMBDA,
    base_merge: BaseMerge = "task_arithmetic",
    ctx: TensorContext = DEFAULT_CTX,
) -> BundleTensor:
    """TALL-Masks: the multi-task vector plus, per task, the entries where that task dominates.

    tau_t = w_t (theta_t - theta0);  tau_MTL = sum_t tau_t  (base_merge ties: TIES, density 0.2, sum)
    m_t = 1[ |tau_t| > lambda_t * |tau_MTL - tau_t| ];  task t: theta0 + m_t * tau_MTL
    Wang et al. 2024, https://arxiv.org/abs/2405.07813
    """
    taus, w = task_vectors(base, experts, weights, "tall_masks")
    taus = taus * w[:, None]  # (T, n)
    lam = resolve_per_task(lambdas, task_names(ctx, len(experts)), "lambdas", DEFAULT_LAMBDA)
    mtl = mtl_vector(taus, base_merge, ctx)  # (n,)
    masks = tall_masks_of(taus, mtl, lam)  # (T, n)
    return BundleTensor(mtl.reshape(base.shape), masks.reshape(len(experts), *base.shape), None)

"""`scaling_masks`: TALL-Masks on task vectors rescaled to a common range (Scaling-Masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import torch
from ..registry import MASK_LAMBDAS, StudyGrid, product, register
from ._ops import (
    DEFAULT_CTX,
    DEFAULT_LAMBDA,
    BaseMerge,
    BundleTensor,
    Lambdas,
    ScaleCap,
    Share,
    Stat,
    TensorContext,
    bind_lambdas,
    mtl_vector,
    range_stats,
    resolve_per_task,
    tall_masks_of,
    task_names,
    task_vectors,
)

if TYPE_CHECKING:
    from torch import Tensor


@register(
    "scaling_masks", paper="https://doi.org/10.1145/3808198", kind="bundle", stream=True, bind_tasks=bind_lambdas,
    study=StudyGrid(rank=70, full=product(lambdas=MASK_LAMBDAS), per_task="lambdas"),
)  # fmt: skip
def scaling_masks(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    lambdas: Lambdas = DEFAULT_LAMBDA,
    stat: Stat = "absmax",
    q: Share = 0.99,
    rho: Share | None = None,
    s_max: ScaleCap = 1e4,
    base_merge: BaseMerge = "task_arithmetic",
    ctx: TensorContext = DEFAULT_CTX,
) -> BundleTensor:
    """Scaling-Masks: amplify weak task vectors to the strongest one's range, then TALL-Masks.

    tau_t = w_t (theta_t - theta0);  r_t = max|tau_t| (absmax) or the q-quantile of |tau_t|;  r* = max_t r_t
    s_t = clip(r* / r_t, 1, s_max) if r_t > 0 and (rho is None or r_t < rho r*), else 1
    tau'_t = s_t tau_t;  tau' = sum_t tau'_t  (base_merge ties: TIES of the tau'_t, density 0.2, sum)
    m_t = 1[ |tau'_t| > lambda_t * |tau' - tau'_t| ];  task t: theta0 + (m_t * tau') / s_t
    Qiu et al., "One Size Does Fit All: Exploring Model Fusion for SE Tasks", doi:10.1145/3808198
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if rho is not None and not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1] or None, got {rho}")
    if not s_max >= 1:
        raise ValueError(f"s_max must be >= 1, got {s_max}")
    taus, w = task_vectors(base, experts, weights, "scaling_masks")
    taus = taus * w[:, None]  # (T, n)
    lam = resolve_per_task(lambdas, task_names(ctx, len(experts)), "lambdas", DEFAULT_LAMBDA)
    r = range_stats(taus, stat, q, ctx)  # of each whole tau_t
    r_star = max(r)
    s = [
        min(max(r_star / r_t, 1.0), s_max) if r_t > 0 and (rho is None or r_t < rho * r_star) else 1.0
        for r_t in r
    ]
    scales = torch.tensor(s, dtype=torch.float32, device=taus.device)  # (T,)
    scaled = taus * scales[:, None]  # (T, n)
    vector = mtl_vector(scaled, base_merge, ctx)  # (n,)
    masks = tall_masks_of(scaled, vector, lam)  # (T, n)
    return BundleTensor(vector.reshape(base.shape), masks.reshape(len(experts), *base.shape), scales)

"""`task_arithmetic`: add the weighted sum of task vectors to the base."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import torch
from ..registry import LAMBDA_FULL, LAMBDA_QUICK, LAMBDA_SMALL, StudyGrid, product, register
from ._ops import DEFAULT_CTX, TensorContext, apply, check_experts

if TYPE_CHECKING:
    from torch import Tensor


@register(
    "task_arithmetic", paper="https://arxiv.org/abs/2212.04089", stream=True,
    study=StudyGrid(
        rank=20, full=product(lambda_=LAMBDA_FULL), quick=product(lambda_=LAMBDA_QUICK),
        small=product(lambda_=LAMBDA_SMALL),
    ),
)  # fmt: skip
def task_arithmetic(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    lambda_: float = 1.0,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """Task arithmetic: the base plus lambda times the weighted sum of task vectors.

    theta = theta0 + lambda * sum_t w_t tau_t,   tau_t = theta_t - theta0
    Ilharco et al. 2023, "Editing models with task arithmetic", https://arxiv.org/abs/2212.04089
    """
    if base is None:
        raise ValueError("method 'task_arithmetic' needs a base model (task vectors are theta_t - theta0)")
    check_experts(experts, weights, "task_arithmetic", base.shape)
    flat = base.reshape(-1).float()
    total = torch.zeros_like(flat)  # (n,)
    tau = torch.empty_like(flat)  # one expert's task vector at a time: no (T, n) stack to fill and re-read
    for w, e in zip(weights, experts, strict=True):
        torch.sub(e.reshape(-1), flat, out=tau)
        total.add_(tau, alpha=float(w))
    return apply(base, total.mul_(lambda_))

"""`linear`: the weighted average of the experts (model soups)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import torch
from ..registry import StudyGrid, register
from ._ops import DEFAULT_CTX, TensorContext, check_experts

if TYPE_CHECKING:
    from torch import Tensor


@register(
    "linear", paper="https://arxiv.org/abs/2203.05482", needs_base=False, stream=True,
    study=StudyGrid(rank=10, full=({},)),
)  # fmt: skip
def linear(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    normalize: bool = True,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """Weighted average of the experts' weights; the base is not used.

    theta = sum_t w_t theta_t / sum_t w_t      (normalize false: theta = sum_t w_t theta_t)
    Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482
    """
    check_experts(experts, weights, "linear")
    total = sum(weights)
    if normalize and total == 0:
        raise ValueError(
            "linear: the weights sum to 0, cannot normalize; change them or set normalize: false"
        )
    merged = torch.zeros(experts[0].shape, dtype=torch.float32, device=experts[0].device)
    for w, e in zip(weights, experts, strict=True):  # expert by expert: no (T, n) stack
        merged.add_(e, alpha=float(w))  # float32 accumulation whatever e's dtype
    if normalize:
        merged.div_(total)
    return merged

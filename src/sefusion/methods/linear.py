"""`linear`: the weighted average of the experts (model soups)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..registry import MergekitForm, StudyGrid, register
from ._ops import DEFAULT_CTX, TensorContext, check_experts

if TYPE_CHECKING:
    from torch import Tensor


def _from_mergekit(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], where: str,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """mergekit's linear divides by the sum of the weights unless `normalize: false`, as sefusion's does."""
    return {"normalize": glob.get("normalize", _MERGEKIT.normalize)}


# mergekit's linear averages base_model too (task_vectors false) and reads no density
_MERGEKIT = MergekitForm(
    rank=0, params=_from_mergekit, parameters=("normalize", "weight"), per_model=("weight",),
    task_vectors=False, normalize=True,
)  # fmt: skip


@register(
    "linear", paper="https://arxiv.org/abs/2203.05482", needs_base=False, stream=True,
    study=StudyGrid(rank=10, full=({},)), mergekit=_MERGEKIT,
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

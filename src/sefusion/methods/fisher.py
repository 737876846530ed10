"""`fisher`: Fisher-weighted averaging, each entry weighted by each expert's diagonal Fisher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from annotated_types import Ge

from .._lazy import torch
from ..registry import StudyGrid, register
from ._data import (
    FISHER,
    StatisticsError,
    check_examples,
    examples_per_expert,
    expert_stats,
)
from ._ops import DEFAULT_CTX, PosInt, TensorContext, check_experts

if TYPE_CHECKING:
    from torch import Tensor

Floor = Annotated[float, Ge(0)]


@register(
    "fisher", paper="https://arxiv.org/abs/2111.09832", needs_base=False, per_expert=("examples",),
    statistics=(FISHER,), study=StudyGrid(rank=90, full=({"floor": 1e-6, "normalize": True},)),
)  # fmt: skip
def fisher(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    examples: PosInt = 256,
    floor: Floor = 1e-6,
    normalize: bool = True,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """Fisher-weighted average of the experts; the base is not used.

    F^_t  = max(F_t, floor)                      F_t: expert t's diagonal Fisher on its own data
    c_t   = w_t / ||F_t||  (normalize)   or  w_t  ||F_t||: L2 norm of F_t over every merged tensor
    theta = sum_t c_t F^_t theta_t / sum_t c_t F^_t
    The floor applies to the raw Fisher and the norm is that of the raw Fisher, as in the authors' code
    (github.com/mmatena/model_merging); with floor 0, entries where every F_t is 0 take sum_t c_t theta_t /
    sum_t c_t. `examples` (per expert) is the number of examples the statistics come from (checked).
    Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", https://arxiv.org/abs/2111.09832
    """
    check_experts(experts, weights, "fisher")
    stats = expert_stats(ctx, len(experts), "fisher", "Fisher")
    where = f"tensor '{ctx.name}'" if ctx.name else "this tensor"
    coeffs = []
    wanted = examples_per_expert(examples, len(experts))
    for s, w, n in zip(stats, weights, wanted, strict=True):
        check_examples(s.examples, n, f"expert '{s.label}'")
        if s.fisher is None:
            raise StatisticsError(f"fisher: the statistics of expert '{s.label}' hold no Fisher for {where}")
        if tuple(s.fisher.shape) != tuple(experts[0].shape):
            raise StatisticsError(
                f"fisher: the Fisher of expert '{s.label}' for {where} has shape {tuple(s.fisher.shape)}, "
                f"the tensor {tuple(experts[0].shape)}"
            )
        if normalize:
            if s.fisher_norm is None:
                raise StatisticsError(
                    f"fisher: normalize needs the model-wide Fisher norm of expert '{s.label}' (not given)"
                )
            if not s.fisher_norm > 0:
                raise StatisticsError(f"fisher: the Fisher of expert '{s.label}' is zero everywhere")
            coeffs.append(float(w) / s.fisher_norm)
        else:
            coeffs.append(float(w))
    device = experts[0].device
    num = torch.zeros(experts[0].shape, dtype=torch.float32, device=device)
    den = torch.zeros_like(num)
    for c, e, s in zip(coeffs, experts, stats, strict=True):  # expert by expert: no (T, n) stack
        f = s.fisher.to(device=device, dtype=torch.float32).clamp(min=floor).mul_(c)  # c_t F^_t
        den.add_(f)
        num.addcmul_(f, e.float())
    merged = num.div_(den)
    empty = den == 0
    if bool(empty.any()):  # floor 0 and no information anywhere: plain weighted average there
        total = sum(coeffs)
        if total == 0:
            raise StatisticsError(
                f"fisher: the weights sum to 0 where no expert has Fisher information ({where})"
            )
        avg = torch.zeros_like(num)
        for c, e in zip(coeffs, experts, strict=True):
            avg.add_(e.float(), alpha=c)
        merged = torch.where(empty, avg / total, merged)
    return merged

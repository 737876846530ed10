"""`regmean`: per linear layer, the weights that best fit every expert's outputs on its own inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from annotated_types import Ge, Le

from .._lazy import torch
from ..registry import StudyGrid, register
from ._data import GRAM, StatisticsError, check_examples, examples_per_expert, expert_stats
from ._ops import DEFAULT_CTX, PosInt, TensorContext, check_experts
from .linear import linear

if TYPE_CHECKING:
    from torch import Tensor

Alpha = Annotated[float, Ge(0), Le(1)]


@register(
    "regmean", paper="https://arxiv.org/abs/2212.09849", needs_base=False, per_expert=("examples",),
    statistics=(GRAM,), study=StudyGrid(rank=100, full=({"alpha": 0.95},)),
)  # fmt: skip
def regmean(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    examples: PosInt = 256,
    alpha: Alpha = 0.95,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """RegMean: the closed-form least-squares merge of a linear layer; other tensors by `linear`.

    For a linear weight W_t (out, in), y = x W_t^T, with G_t = X_t^T X_t (in, in) over its inputs:
      G~_t = alpha G_t + (1 - alpha) diag(G_t)
      W    = (sum_t w_t G~_t)^-1 sum_t w_t G~_t W_t    i.e.  solve (sum_t w_t G~_t) W^T = sum_t w_t G~_t W_t^T
    in float64 with a linear solver (never an explicit inverse). With alpha 1 this is the least-squares
    fit min_W sum_t w_t ||X_t W^T - X_t W_t^T||^2. w_t (default 1) weighs expert t's data. An input that is
    zero in every expert's data (a zero row and column in every G_t) carries no information: that column
    of W is the weighted average of the experts'. A tensor without a Gram matrix in any expert's
    statistics (a bias, a layer norm, an embedding) is merged by `linear`; one with a Gram matrix in some
    experts but not all is an error.
    Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    https://arxiv.org/abs/2212.09849
    """
    check_experts(experts, weights, "regmean")
    stats = expert_stats(ctx, len(experts), "regmean", "Gram")
    where = f"tensor '{ctx.name}'" if ctx.name else "this tensor"
    for s, n in zip(stats, examples_per_expert(examples, len(experts)), strict=True):
        check_examples(s.examples, n, f"expert '{s.label}'")
    held = [s.gram is not None for s in stats]
    if not any(held):
        return linear(base, experts, weights)
    if not all(held):
        lacking = [s.label for s, h in zip(stats, held, strict=True) if not h]
        having = next(s.label for s, h in zip(stats, held, strict=True) if h)
        raise StatisticsError(
            f"regmean: {where} has a Gram matrix in the statistics of expert '{having}' but none in those of "
            f"{', '.join(repr(x) for x in lacking)}; recompute them with the same model code"
        )
    if experts[0].dim() != 2:
        raise StatisticsError(
            f"regmean: {where} has a Gram matrix but shape {tuple(experts[0].shape)}; a linear weight is (out, in)"
        )
    out_f, in_f = experts[0].shape
    for s in stats:
        if tuple(s.gram.shape) != (in_f, in_f):
            raise StatisticsError(
                f"regmean: the Gram matrix of expert '{s.label}' for {where} is {tuple(s.gram.shape)}, "
                f"but the weight (out, in) = {(out_f, in_f)} needs ({in_f}, {in_f})"
            )
    device = experts[0].device
    lhs = torch.zeros((in_f, in_f), dtype=torch.float64, device=device)  # sum_t w_t G~_t     (in, in)
    rhs = torch.zeros((in_f, out_f), dtype=torch.float64, device=device)  # sum_t w_t G~_t W_t^T (in, out)
    for w, e, s in zip(weights, experts, stats, strict=True):
        g = s.gram.to(device=device, dtype=torch.float64)
        shrunk = g * alpha
        shrunk.diagonal().copy_(g.diagonal())  # alpha G + (1 - alpha) diag(G): the diagonal stays whole
        shrunk.mul_(float(w))
        lhs.add_(shrunk)
        rhs.add_(shrunk @ e.to(dtype=torch.float64).T)
    dead = lhs.diagonal() == 0  # inputs never seen: no row or column information in any G_t
    if bool(dead.any()):
        total = float(sum(weights))
        if total == 0:
            raise StatisticsError(f"regmean: the weights sum to 0 ({where})")
        avg = sum(
            float(w) * e.to(device=device, dtype=torch.float64) for w, e in zip(weights, experts, strict=True)
        )
        lhs[dead, dead] = 1.0
        rhs[dead] = (avg / total).T[dead]
    try:
        merged_t = torch.linalg.solve(lhs, rhs)  # (in, out)
    except RuntimeError as exc:  # torch raises on an exactly singular system
        raise StatisticsError(
            f"regmean: the summed Gram matrix of {where} is singular ({exc}); use alpha < 1 or more examples"
        ) from None
    return merged_t.T.to(torch.float32).contiguous()

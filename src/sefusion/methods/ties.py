"""`ties`: TIES-Merging, trim -> elect sign -> disjoint merge."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..registry import LAMBDA_FULL, LAMBDA_SMALL, StudyGrid, product, register
from ._ops import (
    DEFAULT_CTX,
    Density,
    DensityScope,
    Merge,
    ModelThreshold,
    TensorContext,
    apply,
    check_choice,
    model_thresholds,
    per_expert,
    task_vectors,
    tensor_thresholds,
    ties_merge,
    trim_each,
    trim_model_scope,
)

if TYPE_CHECKING:
    from torch import Tensor


def _model_scope(
    kwargs: Mapping[str, Any],
    task_vectors: Callable[[str], Iterator[tuple[str, Any]]],
    names: Sequence[str],
    count: int,
) -> dict[str, list[ModelThreshold]] | None:
    """`density_scope: model`: the exact model-wide thresholds (bounded-memory passes over every tensor),
    each tensor handed its share of the tie budgets; None for the per-tensor scope."""
    if kwargs["density_scope"] != "model":
        return None
    found = model_thresholds(
        lambda: (taus for _, taus in task_vectors("model-wide top-k")), count, kwargs["density"]
    )
    return tensor_thresholds(found, list(names), lambda: task_vectors("model-wide ties"))


# quick: three lambdas per density (the demo's time budget); the tests' tiny budgets: one density
_DENSITIES = (0.1, 0.2, 0.3)


@register(
    "ties", paper="https://arxiv.org/abs/2306.01708", per_expert=("density",), stream=True,
    prepass=_model_scope,
    study=StudyGrid(
        rank=30, full=product(density=_DENSITIES, lambda_=LAMBDA_FULL),
        quick=product(density=_DENSITIES, lambda_=(0.4, 0.7, 1.0)),
        small=product(density=(0.2,), lambda_=LAMBDA_SMALL),
    ),
)  # fmt: skip
def ties(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    density: Density = 0.2,
    lambda_: float = 1.0,
    merge: Merge = "mean",
    density_scope: DensityScope = "tensor",
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """TIES-Merging: keep each task vector's largest entries, elect a sign, average those that agree.

    1. trim:  tau^_t = top-k of tau_t by magnitude, k = ceil(density_t * n)  (exact k, ties by index);
              density_scope model: the model-wide threshold of expert t (ctx.model_thresholds)
    2. elect: gamma = sign(sum_t w_t tau^_t)
    3. merge: A = {t : tau^_t != 0, sign tau^_t = gamma}
              mean: tau_m = sum_A w_t tau^_t / sum_A w_t (0 where A is empty);  sum: sum_A w_t tau^_t
    4. theta = theta0 + lambda * tau_m
    Yadav et al. 2023, https://arxiv.org/abs/2306.01708
    """
    check_choice(density_scope, ("tensor", "model"), "density_scope")
    taus, w = task_vectors(base, experts, weights, "ties")  # (T, n), (T,)
    if density_scope == "model":
        trimmed = trim_model_scope(taus, ctx.model_thresholds)
    else:
        trimmed = trim_each(taus, per_expert(density, len(experts), "density"), ctx)
    return apply(base, lambda_ * ties_merge(trimmed, w, merge))

"""`ties`: TIES-Merging, trim -> elect sign -> disjoint merge."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..registry import LAMBDA_FULL, LAMBDA_SMALL, MergekitForm, StudyGrid, product, register
from ._mergekit import task_vector_params
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


def _from_mergekit(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], where: str,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """density (1.0 by default), lambda, merge mean/sum from normalize; mergekit's L1 rescale is refused."""
    normalize = glob.get("normalize", _MERGEKIT.normalize)
    params = task_vector_params(
        glob, entries, models, notes, normalize=normalize, density=True, sign_election=True
    )
    if glob.get("rescale", _MERGEKIT.rescale):
        raise RecipeError(
            f"{where}: mergekit's ties with `rescale: true` rescales each trimmed task vector to its "
            "original L1 norm; sefusion's ties does not rescale: remove `rescale` or use dare_ties"
        )
    if params["density"] < 1 or any(e["own"].get("density", 1) < 1 for e in entries):
        notes.append(
            "ties keeps ceil(density*n) entries per tensor, ties broken by index, in float32; mergekit "
            "keeps max(1, floor(density*n)) and elects signs in the output dtype: results differ slightly"
        )
    return params


_MERGEKIT = MergekitForm(rank=2, params=_from_mergekit, normalize=True)


@register(
    "ties", paper="https://arxiv.org/abs/2306.01708", per_expert=("density",), stream=True,
    prepass=_model_scope, mergekit=_MERGEKIT,
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

"""`dare_linear` and `dare_ties`: DARE (drop and rescale) task vectors, then add or TIES-merge them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import RecipeError
from ..registry import MergekitForm, StudyGrid, product, register
from ._mergekit import dare_rescale_note, task_vector_params
from ._ops import (
    DEFAULT_CTX,
    Density,
    Merge,
    TensorContext,
    apply,
    dare,
    per_expert,
    task_vectors,
    ties_merge,
)

if TYPE_CHECKING:
    from torch import Tensor

_PAPER = "https://arxiv.org/abs/2311.03099"


def _dare_all(taus: Tensor, density: float | list[float], rescale: bool, ctx: TensorContext) -> Tensor:
    """DARE(tau_t) for every expert, each drawn from its own stream seeded from (seed, tensor name,
    expert index): (T, n)."""
    densities = per_expert(density, taus.shape[0], "density")
    return torch.stack(
        [
            dare(tau, d, rescale, generator=ctx.dare_generator(t))
            for t, (tau, d) in enumerate(zip(taus, densities, strict=True))
        ]
    )


def _linear_from_mergekit(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], where: str,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """density (1.0 by default), lambda, normalized weights if asked, rescale (mergekit: true)."""
    normalize = glob.get("normalize", _MERGEKIT_LINEAR.normalize)
    params = task_vector_params(
        glob, entries, models, notes, normalize=normalize, density=True, sign_election=False
    )
    params["rescale"] = rescale = glob.get("rescale", _MERGEKIT_LINEAR.rescale)
    if rescale:
        dare_rescale_note(notes)
    return params


def _ties_from_mergekit(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], where: str,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """density (1.0 by default), lambda, merge mean/sum from normalize; `rescale: false` is refused."""
    normalize = glob.get("normalize", _MERGEKIT_TIES.normalize)
    params = task_vector_params(
        glob, entries, models, notes, normalize=normalize, density=True, sign_election=True
    )
    if not glob.get("rescale", _MERGEKIT_TIES.rescale):
        raise RecipeError(
            f"{where}: mergekit's dare_ties with `rescale: false` cannot be reproduced: sefusion's "
            "dare_ties always divides the kept entries by density (DARE paper); use dare_linear with "
            "`rescale: false`, or remove `rescale`"
        )
    dare_rescale_note(notes)
    return params


_MERGEKIT_LINEAR = MergekitForm(rank=3, params=_linear_from_mergekit, rescale=True)
_MERGEKIT_TIES = MergekitForm(rank=4, params=_ties_from_mergekit, rescale=True)


@register("dare_linear", paper=_PAPER, per_expert=("density",), stream=True, mergekit=_MERGEKIT_LINEAR)
def dare_linear(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    density: Density = 0.5,
    lambda_: float = 1.0,
    rescale: bool = True,
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """DARE each task vector, then task arithmetic.

    theta = theta0 + lambda * sum_t w_t DARE(tau_t),  DARE(tau) = tau * b / density, b ~ Bernoulli(density)
    (rescale false: tau * b). Yu et al. 2023, https://arxiv.org/abs/2311.03099
    """
    taus, w = task_vectors(base, experts, weights, "dare_linear")  # (T, n), (T,)
    return apply(base, lambda_ * (w[:, None] * _dare_all(taus, density, rescale, ctx)).sum(0))


# DARE's rescale keeps each expert's expected task vector, so the study keeps lambda at 1
@register(
    "dare_ties", paper=_PAPER, per_expert=("density",), stream=True, mergekit=_MERGEKIT_TIES,
    study=StudyGrid(rank=40, full=product(density=(0.1, 0.3, 0.5), lambda_=(1.0,))),
)  # fmt: skip
def dare_ties(
    base: Tensor | None,
    experts: list[Tensor],
    weights: list[float],
    *,
    density: Density = 0.5,
    lambda_: float = 1.0,
    merge: Merge = "mean",
    ctx: TensorContext = DEFAULT_CTX,
) -> Tensor:
    """DARE each task vector, then TIES sign election and disjoint merge (no magnitude trim).

    tau^_t = DARE(tau_t);  gamma = sign(sum_t w_t tau^_t);  A = {t : tau^_t != 0, sign tau^_t = gamma}
    theta = theta0 + lambda * tau_m, tau_m the TIES mean (or sum) over A.
    Yu et al. 2023, https://arxiv.org/abs/2311.03099
    """
    taus, w = task_vectors(base, experts, weights, "dare_ties")  # (T, n), (T,)
    return apply(base, lambda_ * ties_merge(_dare_all(taus, density, True, ctx), w, merge))

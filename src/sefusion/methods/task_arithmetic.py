"""`task_arithmetic`: add the weighted sum of task vectors to the base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..registry import LAMBDA_FULL, LAMBDA_QUICK, LAMBDA_SMALL, MergekitForm, StudyGrid, product, register
from ._mergekit import task_vector_params
from ._ops import DEFAULT_CTX, TensorContext, apply, check_experts

if TYPE_CHECKING:
    from torch import Tensor


def _from_mergekit(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], where: str,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """lambda, weights divided by their sum with `normalize: true`; density and rescale are noted unused."""
    normalize = glob.get("normalize", _MERGEKIT.normalize)
    params = task_vector_params(
        glob, entries, models, notes, normalize=normalize, density=False, sign_election=False
    )
    ignored: list[str] = [k for k in ("density", "rescale") if k in glob]
    ignored += [f"{e['place']}.density" for e in entries if "density" in e["own"]]
    if ignored:
        notes.append(f"{', '.join(ignored)}: no effect in mergekit's task_arithmetic (no sparsification)")
    return params


_MERGEKIT = MergekitForm(rank=1, params=_from_mergekit)


@register(
    "task_arithmetic", paper="https://arxiv.org/abs/2212.04089", stream=True, mergekit=_MERGEKIT,
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

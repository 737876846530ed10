"""Task heads on pooled embeddings: classification (a linear layer per task) and retrieval (no head).

A classification head is ``logits = pooled @ W.T + b`` with ``W`` (num_labels, hidden), stored as
``head.{task}.weight`` and ``head.{task}.bias``; heads are never fused (the study excludes ``head.*``).
Retrieval scores a query against candidates by cosine similarity of their pooled embeddings and
trains with the in-batch contrastive loss (InfoNCE, as sentence-transformers' MultipleNegativesRanking):
``L = CE(cos(q_i, c_j) / tau, target = i)``, every other candidate of the batch being a negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SefusionError

HEAD_PREFIX = "head."
CLASSIFY = "classify"
RETRIEVAL = "retrieval"
HEAD_KINDS = (CLASSIFY, RETRIEVAL)


def head_names(task: str) -> tuple[str, str]:
    """(weight name, bias name) of a task's classification head."""
    return f"{HEAD_PREFIX}{task}.weight", f"{HEAD_PREFIX}{task}.bias"


def head_kind(spec: Any, task: str, n_labels: int | None = None) -> str:
    """The head of a task spec ("classify" or "retrieval"), checked; names the task when it is wrong.

    `n_labels` is the class count (the built data's labels may refine the spec's); None: the spec's.
    """
    kind = getattr(spec, "head", None)
    if kind not in HEAD_KINDS:
        raise SefusionError(
            f"task '{task}' has no usable head spec (head={kind!r}); expected one of {', '.join(HEAD_KINDS)}"
        )
    if n_labels is None:
        n_labels = len(getattr(spec, "labels", None) or [])
    if kind == CLASSIFY and n_labels < 2:
        raise SefusionError(f"classification task '{task}' needs at least 2 labels, got {n_labels}")
    return kind


def init_head(
    task: str, hidden: int, num_labels: int, *, seed: int = 0, std: float = 0.02
) -> dict[str, Tensor]:
    """A fresh head: weight ~ N(0, std^2) (BERT's initializer range), bias 0, seeded by `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    w_name, b_name = head_names(task)
    return {w_name: torch.randn(num_labels, hidden, generator=g) * std, b_name: torch.zeros(num_labels)}


def head_tasks(heads: Mapping[str, Tensor]) -> list[str]:
    """The tasks a dict of head tensors serves (``head.{task}.weight``), sorted."""
    return sorted({n[len(HEAD_PREFIX) :].rsplit(".", 1)[0] for n in heads if n.startswith(HEAD_PREFIX)})


def get_head(heads: Mapping[str, Tensor], task: str) -> tuple[Tensor, Tensor]:
    """(W, b) of `task` from a dict of head tensors; a clear error lists the heads it has."""
    w_name, b_name = head_names(task)
    if w_name not in heads or b_name not in heads:
        have = head_tasks(heads)
        raise SefusionError(f"no head for task '{task}' (heads present: {', '.join(have) or 'none'})")
    return heads[w_name], heads[b_name]


def classify_logits(pooled: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(B, num_labels) = pooled (B, H) @ W.T (H, num_labels) + b."""
    return F.linear(pooled, weight.to(pooled.dtype), bias.to(pooled.dtype))


def cosine_matrix(queries: Tensor, candidates: Tensor) -> Tensor:
    """(Q, P) cosine similarities of query (Q, H) and candidate (P, H) embeddings."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T


def contrastive_loss(queries: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """In-batch contrastive loss: query i's positive is candidate i, the batch's others are negatives."""
    sim = cosine_matrix(queries, candidates) / temperature  # (B, B)
    return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(body, heads) of a model file's tensors: heads are the ``head.*`` names."""
    body = {n: t for n, t in state.items() if not n.startswith(HEAD_PREFIX)}
    heads = {n: t for n, t in state.items() if n.startswith(HEAD_PREFIX)}
    return body, heads

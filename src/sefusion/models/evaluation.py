"""Score a body + heads on one split of a task, from in-memory tensors (no files: merged models too).

The model side lives here (encode, classify, similarity); the metric is the task layer's
(`sefusion.tasks.base.score`), so every row of a study is scored by one definition:

* classify: predictions ``argmax(head(pooled))`` -> accuracy, and ``per_kind`` the accuracy within each
  group named by ``example.meta["kind"]`` (defect: a bug kind with its clean originals).
* retrieval: the split is the candidate pool; query i is ``examples[i].text``, candidates are the
  ``text_pair`` codes, ranked by cosine similarity of pooled embeddings; gold of query i is
  ``examples[i].label`` (its own position); MRR with ties counted against the query.

One Encoder per base folder is kept in memory and reloaded with each body (``load_body_state`` is a
copy of the tensors), so scoring 50+ merged models costs no model construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..errors import SefusionError
from .encoder import Encoder
from .heads import CLASSIFY, classify_logits, cosine_matrix, get_head, head_kind, split_state

if TYPE_CHECKING:
    from ..tasks.base import Example, TaskData, TaskSpec

_ENCODERS: dict[tuple[str, str, int | None], Encoder] = {}


def get_encoder(base: str | Path, device: str = "cpu", *, intermediate_size: int | None = None) -> Encoder:
    """The in-memory Encoder of `base` (built once per process, folder and FFN width, then reused);
    `intermediate_size` other than None: the base's architecture with that FFN width."""
    key = (str(Path(base).resolve()), str(device), intermediate_size)
    enc = _ENCODERS.get(key)
    if enc is None:
        enc = _ENCODERS[key] = Encoder.from_pretrained(
            base, device=device, intermediate_size=intermediate_size
        )
    return enc


def encoder_for(base: str | Path, body: Mapping[str, Tensor], device: str = "cpu") -> Encoder:
    """The Encoder that `body` fits: the base's, or the base's architecture with the FFN width of `body`
    when its FFN tensors are wider (a PLeaS merge with budget < 1)."""
    enc = get_encoder(base, device)
    for name, key in enc.name_map.items():
        if name.endswith("intermediate.dense.weight") and name in body:
            width = int(body[name].shape[0])
            if width != int(enc._tensor(key).shape[0]):
                return get_encoder(base, device, intermediate_size=width)
            break  # any other mismatch: load_body_state names it
    return enc


def clear_encoders() -> None:
    """Forget the cached encoders (frees their memory)."""
    _ENCODERS.clear()


def load_model(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(body, heads) of a model folder written by `finetune`/`head_only` (or the base: heads empty).

    The body holds the folder's floating tensors except ``head.*``, under their file names.
    """
    from ..io import open_model

    with open_model(folder) as r:
        state = {n: r.get(n) for n in r.names() if r.dtype(n).is_floating_point}
    return split_state(state)


def mrr(similarity: Tensor, gold: Sequence[int]) -> float:
    """Mean reciprocal rank (the task layer's definition: ties count against the query)."""
    from ..tasks.base import mrr as task_mrr

    return task_mrr(similarity, gold)


def num_labels(data: TaskData, spec: TaskSpec) -> int:
    """Class count of a classification task: the built data's labels, else the spec's."""
    return len(getattr(data, "labels", None) or getattr(spec, "labels", None) or [])


def predict(
    encoder: Encoder,
    examples: Sequence[Example],
    weight: Tensor,
    bias: Tensor,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    precision: str = "fp32",
) -> list[int]:
    """Predicted class index per example (text, or text + text_pair as one sequence)."""
    pairs = [ex.text_pair for ex in examples]
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise SefusionError("some examples have a text_pair and some do not; a task uses one form")
    emb = encoder.encode(
        [ex.text for ex in examples],
        [str(p) for p in pairs] if all(has_pair) else None,
        batch_size,
        max_length=max_length,
        precision=precision,
    )
    return classify_logits(emb, weight.float(), bias.float()).argmax(-1).tolist()


def retrieval_similarity(
    encoder: Encoder,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    precision: str = "fp32",
) -> Tensor:
    """(Q, P) cosine similarity of each query (``text``) to each candidate (``text_pair``) of the pool."""
    for i, ex in enumerate(examples):
        if ex.text_pair is None:
            raise SefusionError(f"retrieval example {i} has no text_pair (the candidate code)")
    kw = {"max_length": max_length, "precision": precision}
    q = encoder.encode([ex.text for ex in examples], None, batch_size, **kw)
    c = encoder.encode([str(ex.text_pair) for ex in examples], None, batch_size, **kw)
    return cosine_matrix(q, c)


def split_examples(data: TaskData, split: str) -> list[Example]:
    """The examples of one split; an unknown or empty split is an error naming the task."""
    if split not in data.splits:
        raise SefusionError(f"task '{data.task}' has no split '{split}'; it has: {', '.join(data.splits)}")
    examples = list(data.splits[split])
    if not examples:
        raise SefusionError(f"split '{split}' of task '{data.task}' is empty")
    return examples


def evaluate(
    body: Mapping[str, Tensor],
    heads: Mapping[str, Tensor],
    data: TaskData,
    split: str,
    spec: TaskSpec,
    *,
    base: str | Path,
    batch_size: int = 64,
    max_length: int = 128,
    encoder: Encoder | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Score `body` (+ the task's head from `heads`) on `split` of `data`: {"score", "per_kind", "n",
    "per_example", "clusters"}: each example's score (0/1 or reciprocal rank; their mean is "score") and
    its source file (what a cluster bootstrap resamples, `sefusion.study.uncertainty`).

    `body` uses the checkpoint names of `base` (``head.*`` entries and tensors the encoder does not
    use are ignored); the encoder comes from `base` (config, tokenizer) unless one is passed.
    `precision`: "fp32", or "bf16" autocast for the body's forward passes (`Encoder.encode_items`).
    """
    from ..tasks.base import example_clusters, score

    kind = head_kind(spec, data.task, num_labels(data, spec))
    examples = split_examples(data, split)
    enc = encoder if encoder is not None else encoder_for(base, body)
    enc.load_body_state(body)
    kw = {"batch_size": batch_size, "max_length": max_length, "precision": precision}
    if kind == CLASSIFY:
        w, b = get_head(heads, data.task)
        n = num_labels(data, spec)
        if w.shape[0] != n:
            raise SefusionError(
                f"head of task '{data.task}' has {w.shape[0]} outputs but the task has {n} labels"
            )
        pred = predict(enc, examples, w, b, **kw)
    else:
        pred = retrieval_similarity(enc, examples, **kw)
    res = score(spec, pred, examples)
    return {
        "score": float(res["score"]),
        "per_kind": dict(res.get("per_kind") or {}),
        "n": int(res["n"]),
        "per_example": [float(v) for v in res["per_example"]],
        "clusters": example_clusters(examples),
    }

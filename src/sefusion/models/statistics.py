"""The statistics pass: run each expert over examples of its own task, keep what the data-aware methods read.

* ``fisher``: the diagonal Fisher of every body tensor. A classification expert uses the exact
  expectation over its head's classes, E_x sum_y p(y|x) (d log p(y|x) / d theta)^2, with p from the expert
  itself (no labels needed); a retrieval expert the empirical Fisher of its in-batch contrastive loss,
  -log softmax(cos(q_i, c_.) / tau)_i, over batches of `batch_size` pairs (the loss it was trained on).
* ``gram``: for every nn.Linear of the body, G = X^T X over the (unpadded) tokens of its inputs.
* PLeaS: the inputs of every linear layer and the final hidden states, row by row (`encoder_activations`).

Heads are never merged, so they get no statistics; they only shape the Fisher (the classes' log-probs).
Statistics are written once per (expert weights, data, examples, kinds, length, batch) under
``CACHE/stats/`` (sefusion.stats format, atomically) and reused: `statistics_for` returns the folder.

``data`` is a built task (`TaskData`), a study task name (``defect-python``: its train split is built),
or a JSONL file with one example per line, ``{"text": ..., "text_pair": ...}`` (classification: the
input, a pair for pair tasks; retrieval: query and code). Examples are a seeded sample of ``examples`` of
them; fewer available is an error ("too few examples").
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from ..stats import (
    FISHER,
    GRAM,
    KINDS,
    FisherAccumulator,
    GramAccumulator,
    LinearInputRecorder,
    Statistics,
    StatisticsError,
    cache_key,
    check_kinds,
)
from .encoder import Encoder
from .heads import CLASSIFY, RETRIEVAL, classify_logits, cosine_matrix, get_head, head_tasks

if TYPE_CHECKING:
    from ..tasks.base import Example, TaskData

__all__ = [
    "StatsData",
    "collect_statistics",
    "encoder_activations",
    "load_stats_data",
    "statistics_for",
]

T = TypeVar("T")
FORMAT = 1  # bump when the pass changes what a key produces


@dataclass(frozen=True)
class StatsData:
    """The examples a statistics pass runs: `task` names the head (classify) or is the retrieval task."""

    task: str
    kind: str  # classify | retrieval
    examples: list[Example]
    name: str  # a task name or a JSONL path: what the report shows
    fingerprint: str  # sha256 over the examples' texts


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.text_pair], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def sample_examples(examples: Sequence[T], n: int, seed: int, what: str) -> list[T]:
    """A seeded sample of `n` of `examples`, in their order (too few: an error naming `what`)."""
    if n < 1:
        raise StatisticsError(f"examples must be >= 1, got {n}")
    if len(examples) < n:
        raise StatisticsError(
            f"too few examples for the statistics of {what}: {len(examples)} available, {n} asked "
            "(`examples:`); give more data or lower `examples`"
        )
    order = list(range(len(examples)))
    random.Random(f"sefusion-stats-{seed}-{what}").shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


def _read_jsonl(path: Path) -> list[Example]:
    from ..tasks.base import Example
    from ..tasks.corpus_jsonl import jsonl_records
    from ..tasks.corpus_types import CorpusError

    out = []
    try:
        for i, rec in jsonl_records(path):
            if not isinstance(rec.get("text"), str):
                raise StatisticsError(
                    f"{path}:{i}: each line needs a string 'text' (and 'text_pair' for pairs)"
                )
            pair = rec.get("text_pair")
            if pair is not None and not isinstance(pair, str):
                raise StatisticsError(f"{path}:{i}: 'text_pair' must be a string")
            out.append(Example(rec["text"], pair, int(rec.get("label", 0) or 0)))
    except CorpusError as exc:
        raise StatisticsError(str(exc)) from None
    if not out:
        raise StatisticsError(f"the data file {path} holds no example")
    return out


def load_stats_data(
    data: TaskData | str | Path,
    examples: int,
    *,
    heads: Mapping[str, Tensor],
    seed: int = 0,
    cache: Path | None = None,
    dirs: Mapping[str, Any] | None = None,
    split: str = "train",
) -> StatsData:
    """The `examples` examples a pass runs for an expert with these `heads` on `data` (see the module doc)."""
    from ..tasks.base import TaskData, build_task, get_task

    have = head_tasks(heads)
    if isinstance(data, TaskData) or (isinstance(data, str) and not str(data).endswith(".jsonl")):
        if isinstance(data, TaskData):
            built = data
        else:
            get_task(str(data))  # an unknown name fails here, listing the tasks
            sizes = {"train": max(2400, examples), "validation": 1, "test": 1, "pool": 1}
            built = build_task(str(data), sizes=sizes, seed=seed, cache=cache, dirs=dirs)
        spec, _ = get_task(built.task)
        kind = CLASSIFY if spec.head == CLASSIFY else RETRIEVAL
        if kind == CLASSIFY and built.task not in have:
            raise StatisticsError(
                f"the expert has no head for task '{built.task}' (heads: {', '.join(have) or 'none'}); "
                "give the data of the task it was fine-tuned on"
            )
        pool = built.splits.get(split) or []
        chosen = sample_examples(pool, examples, seed, built.task)
        return StatsData(built.task, kind, chosen, built.task, _fingerprint(chosen))
    path = Path(data)
    if not path.is_file():
        raise StatisticsError(f"data file {path} does not exist")
    if len(have) > 1:
        raise StatisticsError(
            f"the expert has heads for several tasks ({', '.join(have)}): give `data:` as one of those task "
            "names, not a JSONL file"
        )
    rows = _read_jsonl(path)
    kind = CLASSIFY if have else RETRIEVAL
    if kind == RETRIEVAL and any(ex.text_pair is None for ex in rows):
        raise StatisticsError(
            f"{path}: the expert has no classification head, so the data is retrieval (query, code): every "
            "line needs 'text' and 'text_pair'"
        )
    chosen = sample_examples(rows, examples, seed, str(path))
    task = have[0] if have else path.stem
    return StatsData(task, kind, chosen, str(path), _fingerprint(chosen))


# --------------------------------------------------------------------------------------- the pass


def _items(enc: Encoder, examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    pairs = [ex.text_pair for ex in examples]
    both = all(p is not None for p in pairs)
    if any(p is not None for p in pairs) and not both:
        raise StatisticsError("some examples have a text_pair and some do not; a task uses one form")
    return enc.tokenize([ex.text for ex in examples], [str(p) for p in pairs] if both else None,
                        max_length=max_length)  # fmt: skip


def collect_statistics(
    enc: Encoder,
    heads: Mapping[str, Tensor],
    sd: StatsData,
    kinds: Iterable[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    temperature: float = 0.05,
    quiet: bool = False,
    **meta: Any,
) -> Statistics:
    """Run the encoder (its body already loaded) over `sd` and collect the `kinds` asked for.

    Classification runs one example at a time (the exact Fisher needs per-example gradients; no padding,
    so the Gram hooks see every token once); retrieval runs batches of `batch_size` pairs (the
    contrastive loss needs its in-batch negatives), the Gram hooks masked to real tokens.
    """
    from tqdm.auto import tqdm

    kinds = set(check_kinds(kinds))
    names = {key: name for name, key in enc.name_map.items()}  # model key -> checkpoint name
    fisher = None
    if FISHER in kinds:
        fisher = FisherAccumulator((names[k], p) for k, p in enc.body_parameters() if p.requires_grad)
    gram = GramAccumulator(enc.model, rename=names.get) if GRAM in kinds else None
    model = enc.model
    was_training = model.training
    model.eval()  # no dropout: the statistics of the expert itself
    n = len(sd.examples)
    bar = tqdm(total=n, desc=f"statistics {sd.task}", unit="ex", leave=False, disable=quiet)
    try:
        if sd.kind == CLASSIFY:
            w, b = get_head(heads, sd.task)
            w, b = w.float().to(enc.device), b.float().to(enc.device)

            def logits(**batch: Tensor) -> Tensor:
                return classify_logits(enc.pool(batch), w, b)

            for item in _items(enc, sd.examples, max_length):
                batch = enc.collate([item])
                if fisher is not None:
                    fisher.add_classification(logits, batch)
                else:
                    with torch.no_grad():
                        logits(**batch)
                if gram is not None:
                    gram.add_examples(1)
                bar.update(1)
        else:
            queries = enc.tokenize([ex.text for ex in sd.examples], max_length=max_length)
            codes = enc.tokenize([str(ex.text_pair) for ex in sd.examples], max_length=max_length)
            for s in range(0, n, batch_size):
                q_batch = enc.collate(queries[s : s + batch_size])
                c_batch = enc.collate(codes[s : s + batch_size])
                with torch.set_grad_enabled(fisher is not None):
                    with gram.masked(q_batch["attention_mask"]) if gram is not None else nullcontext():
                        q = enc.pool(q_batch)
                    with gram.masked(c_batch["attention_mask"]) if gram is not None else nullcontext():
                        c = enc.pool(c_batch)
                    if fisher is not None:
                        sim = cosine_matrix(q, c) / temperature  # (B, B)
                        losses = -torch.log_softmax(sim.double(), dim=-1).diagonal()  # (B,)
                        fisher.add_empirical(losses)
                if gram is not None:
                    gram.add_examples(q.shape[0])
                bar.update(q.shape[0])
    finally:
        bar.close()
        if gram is not None:
            gram.close()
        model.train(was_training)
    return Statistics.collect(
        examples=n,
        fisher=fisher,
        gram=gram,
        task=sd.task,
        data=sd.name,
        kind=sd.kind,
        **meta,
    )


def statistics_for(
    expert: str | Path,
    *,
    data: TaskData | str | Path,
    examples: int = 256,
    kinds: Iterable[str] = KINDS,
    base: str | Path | None = None,
    cache: str | Path | None = None,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
    temperature: float = 0.05,
    quiet: bool = False,
    dirs: Mapping[str, Any] | None = None,
) -> Path:
    """The folder of `expert`'s statistics on `data` (computed once, then read from the cache).

    `expert`: a model folder (an expert written by `finetune`, or any encoder folder whose classification
    head, if any, is stored as ``head.{task}.weight/bias``). `base` gives config and tokenizer when the
    expert folder lacks them (default: the expert folder itself).
    """
    from .config import default_cache
    from .evaluation import get_encoder, load_model
    from .train import base_sha256

    expert = Path(expert)
    if not expert.is_dir():
        raise StatisticsError(f"expert folder {expert} does not exist")
    kinds = sorted(set(kinds))
    cache_dir = Path(cache) if cache is not None else default_cache()
    body, heads = load_model(expert)
    sd = load_stats_data(data, examples, heads=heads, seed=seed, cache=cache_dir, dirs=dirs)
    sha = base_sha256(expert)  # the experts' own cache key hash: memoized per process
    key = cache_key(
        expert_sha256=sha,
        task=sd.task,
        data=sd.fingerprint,
        examples=examples,
        kinds=kinds,
        max_length=max_length,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        format=FORMAT,
    )
    folder = cache_dir / "stats" / f"{sd.task}-{key}"
    if (folder / "stats.json").is_file():
        return folder
    source = Path(base) if base is not None else expert
    enc = get_encoder(source)
    enc.load_body_state(body)
    stats = collect_statistics(
        enc, heads, sd, kinds, max_length=max_length, batch_size=batch_size, temperature=temperature,
        quiet=quiet, expert_path=str(expert), expert_sha256=sha,
    )  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    stats.save(folder, overwrite=True)
    return folder


# --------------------------------------------------------------------------------------- PLeaS


def encoder_activations(
    enc: Encoder,
    body: Mapping[str, Tensor],
    items: Sequence[Mapping[str, list[int]]],
    keys: Sequence[str],
    *,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """PLeaS's features of one body: {linear weight name: input rows, "last_hidden_state": rows}.

    Rows are the real tokens of `items` (padding left out), in item order, so two bodies run on the same
    items give rows that correspond one to one.
    """
    from ..methods.pleas import OUTPUT

    enc.load_body_state(body)
    names = {key: name for name, key in enc.name_map.items()}
    wanted = set(keys)
    model = enc.model
    was_training = model.training
    model.eval()
    rec = LinearInputRecorder(model, rename=lambda n: names.get(n) if names.get(n) in wanted else None)
    try:
        with torch.inference_mode():
            for s in range(0, len(items), batch_size):
                batch = enc.collate(items[s : s + batch_size])
                mask = batch["attention_mask"].bool()
                with rec.masked(mask):
                    hidden = model(**batch).last_hidden_state  # (B, L, H)
                rec.add(OUTPUT, hidden[mask])
    finally:
        rec.close()
        model.train(was_training)
    return rec.activations()


def pleas_items(
    enc: Encoder, datas: Sequence[TaskData], examples: int, *, seed: int = 0, max_length: int = 128
) -> list[dict[str, list[int]]]:
    """The inputs PLeaS matches on: `examples` train examples split evenly over the tasks (the first task
    takes the odd one), tokenized as each task's model reads them (retrieval: the code alone, the side that
    carries the rows; classification: the text, with its pair for pair tasks)."""
    from ..tasks.base import get_task

    if examples < len(datas):
        raise StatisticsError(
            f"pleas: examples ({examples}) must be at least the number of tasks ({len(datas)})"
        )
    out: list[dict[str, list[int]]] = []
    share = [examples // len(datas) + (1 if i < examples % len(datas) else 0) for i in range(len(datas))]
    for d, k in zip(datas, share, strict=True):
        chosen = sample_examples(d.splits.get("train") or [], k, seed, d.task)
        if get_task(d.task)[0].head == CLASSIFY:
            out += _items(enc, chosen, max_length)
        else:
            out += enc.tokenize([str(ex.text_pair) for ex in chosen], max_length=max_length)
    return out


def expert_statistics(expert: str | Path, **kwargs: Any) -> Any:
    """`statistics_for(expert, **kwargs)` opened as a store (sefusion.stats.StatsStore): what the study
    and the engine read tensor by tensor."""
    from ..stats import open_stats

    return open_stats(statistics_for(expert, **kwargs))


def pleas_fuse(
    base: str | Path,
    bodies: Sequence[Mapping[str, Tensor]],
    heads: Sequence[Mapping[str, Tensor]],
    datas: Sequence[TaskData],
    *,
    examples: int = 256,
    budget: float = 1.0,
    seed: int = 0,
    max_length: int = 128,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """PLeaS over two experts of one base: (merged body, each task's head reading the merged stream).

    Both bodies run on the same `examples` train examples (half from each task), their hidden units are
    matched and every layer is fit by least squares (`sefusion.methods.pleas.merge_encoders`). The merged
    residual stream is in model A's unit order, so A's head is kept and B's reads B's units through the
    matching (`EncoderMerge.head_input`). `budget` < 1 keeps both models' least-matched FFN units: the
    body's FFN is wider than the base's (`evaluation.encoder_for` builds the encoder it fits).
    """
    from ..methods.pleas import check_pair, encoder_activation_keys, merge_encoders
    from .evaluation import get_encoder

    check_pair(len(bodies))
    enc = get_encoder(base)
    items = pleas_items(enc, datas, examples, seed=seed, max_length=max_length)
    names = list(bodies[0])
    keys = encoder_activation_keys(names)

    def activations(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return encoder_activations(enc, state, items, keys)

    merged = merge_encoders(
        [dict(b) for b in bodies],
        activations,
        num_heads=int(enc.model.config.num_attention_heads),
        budget=budget,
    )
    out_heads = []
    for i, h in enumerate(heads):
        mapped = {}
        for name, t in h.items():
            mapped[name] = merged.head_input(t, i) if name.endswith(".weight") and t.dim() == 2 else t
        out_heads.append(mapped)
    return merged.state_dict, out_heads

"""The study's independent pieces of work, as module-level functions an executor runs in process or on a
Ray worker (sefusion.study.executor): an expert's or the multitask model's fine-tuning, a head on the
frozen base, an expert's statistics, a candidate's merge and validation scoring, a chosen candidate's
merge and test scoring.

A piece takes everything it reads as arguments (the candidates' shared `Inputs` once, from Ray's object
store), writes nothing but the models API's own cache, and returns a small result: the evaluation records
it made. The driver alone writes them into the study's records, so an interrupted run resumes anywhere.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..registry import METHODS
from . import scores
from .api import Candidate


@dataclass(frozen=True)
class Inputs:
    """What every candidate piece reads: the models API, the tasks' data and specs, the base's and the
    experts' tensors, the experts' statistics, and the study's settings."""

    models: Any  # the models API, or the name of the module that is one (a module does not pickle)
    base: Path
    tasks: tuple[str, ...]
    data: Mapping[str, Any]
    specs: Mapping[str, Any]
    base_body: Mapping[str, Any]
    bodies: Mapping[str, Mapping[str, Any]]  # each expert's body, by task
    heads: Mapping[str, Mapping[str, Any]]  # each expert's head tensors, by task
    stats: Sequence[Any] | None  # each expert's statistics, in task order (the data-aware methods)
    seed: int
    max_length: int
    precision: str
    threads: int | None  # torch threads in a piece; None: the process's own (a run in process)


def portable(models: Any) -> Any:
    """The models API as a piece's argument: a module by its name, anything else as it is."""
    return models.__name__ if isinstance(models, ModuleType) else models


def models_api(ref: Any) -> Any:
    return importlib.import_module(ref) if isinstance(ref, str) else ref


def use_threads(n: int | None) -> int:
    """A piece on Ray computes with its own CPUs (`num_cpus`), whatever the worker inherited; returns the
    torch threads in effect (None: the process's own)."""
    import torch

    if n is not None:
        os.environ["SEFUSION_THREADS"] = str(n)  # the models API's thread setup reads it, in this worker only
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def record_of(res: Mapping[str, Any]) -> dict[str, Any]:
    """What the records keep of an evaluation: score, per-kind scores, n, and the per-example scores
    (encoded; None when the models API gives none, so the record is not scored again for them)."""
    out = {k: v for k, v in res.items() if k in ("score", "per_kind", "n")}
    per = res.get("per_example")
    out["per_example"] = scores.encode_scores(per) if per is not None else None
    return out


def fine_tune(
    models: Any,
    data: Sequence[Any],
    specs: Sequence[Any],
    base: Path,
    cfg: Any,
    cache: Path,
    quiet: bool,
    threads: int | None,
) -> dict[str, Any]:
    """The base fine-tuned on the tasks `data` (one: an expert; several: the multitask model); the models
    API caches it, so a second call reads the cache."""
    use_threads(threads)
    t0 = time.perf_counter()
    folder = models_api(models).finetune(base, list(data), list(specs), cfg, cache, quiet=quiet)
    return {"folder": folder, "seconds": time.perf_counter() - t0}


def head_only(
    models: Any, data: Any, spec: Any, base: Path, cfg: Any, cache: Path, quiet: bool, threads: int | None
) -> dict[str, Any]:
    """A head trained on the frozen base (the `pretrained` row of a classification task), cached."""
    use_threads(threads)
    t0 = time.perf_counter()
    folder = models_api(models).head_only(base, data, spec, cfg, cache, quiet=quiet)
    return {"folder": folder, "seconds": time.perf_counter() - t0}


def statistics(
    models: Any,
    data: Any,
    examples: int,
    kinds: Sequence[str],
    seed: int,
    base: Path,
    cfg: Any,
    cache: Path,
    quiet: bool,
    threads: int | None,
    expert: Mapping[str, Any],
) -> dict[str, Any]:
    """An expert's statistics (`kinds`) on `examples` of its own train data, cached by the models API."""
    use_threads(threads)
    t0 = time.perf_counter()
    stats = models_api(models).expert_statistics(
        expert["folder"], data=data, examples=examples, kinds=list(kinds), base=base, cache=cache, seed=seed,
        max_length=cfg.max_length, quiet=quiet,
    )  # fmt: skip
    return {"stats": stats, "seconds": time.perf_counter() - t0}


def candidate(inputs: Inputs, method: str, params: Mapping[str, Any]) -> Candidate:
    """(bodies, heads, mask stats) of one candidate of `method`."""
    spec, tasks = METHODS.get(method), list(inputs.tasks)
    experts = [inputs.bodies[t] for t in tasks]
    if spec.kind == "whole_model":
        run = getattr(models_api(inputs.models), str(spec.study_fuse))
        options = {k: v for k, v in params.items() if k in spec.params}
        body, new_heads = run(inputs.base, experts, [inputs.heads[t] for t in tasks],
                              [inputs.data[t] for t in tasks], seed=inputs.seed, max_length=inputs.max_length,
                              **options)  # fmt: skip
        return {t: body for t in tasks}, dict(zip(tasks, new_heads, strict=True)), {}
    from .runner import fuse

    bodies, stats = fuse(method, params, inputs.base_body, experts, tasks, inputs.seed, stats=inputs.stats)
    return bodies, inputs.heads, stats


def evaluation(
    inputs: Inputs,
    task: str,
    split: str,
    body: Mapping[str, Any],
    head: Mapping[str, Any],
    precision: str | None,
) -> dict[str, Any]:
    """One evaluation's record: `body` with `head` on `split` of `task`."""
    res = models_api(inputs.models).evaluate(
        body, head, inputs.data[task], split, inputs.specs[task], base=inputs.base,
        max_length=inputs.max_length, precision=precision or inputs.precision,
    )  # fmt: skip
    return record_of(res)


def _scored(
    inputs: Inputs, method: str, params: Mapping[str, Any], split: str, known: Sequence[str]
) -> tuple[dict[str, Any], Candidate, float]:
    """(records of the tasks not `known`, the candidate, seconds spent scoring)."""
    use_threads(inputs.threads)
    cand = candidate(inputs, method, params)
    bodies, heads, _ = cand
    records, spent = {}, 0.0
    for t in inputs.tasks:
        if t not in known:
            t0 = time.perf_counter()
            records[t] = evaluation(inputs, t, split, bodies[t], heads[t], None)
            spent += time.perf_counter() - t0
    return records, cand, spent


def score_validation(
    method: str, params: Mapping[str, Any], known: Sequence[str], inputs: Inputs
) -> dict[str, Any]:
    """A candidate merged and scored on validation for every task not already `known` (recorded)."""
    t0 = time.perf_counter()
    records, _, spent = _scored(inputs, method, params, "validation", known)
    return {"records": records, "eval_s": spent, "seconds": time.perf_counter() - t0}


def score_test(
    method: str, params: Mapping[str, Any], known: Sequence[str], inputs: Inputs
) -> dict[str, Any]:
    """The chosen candidate merged (always: its mask statistics and storage are part of its row) and
    scored on test for every task not already `known`."""
    from .runner import storage_bytes

    t0 = time.perf_counter()
    records, (bodies, heads, masks), spent = _scored(inputs, method, params, "test", known)
    storage = storage_bytes(method, bodies[inputs.tasks[0]], heads)
    return {"records": records, "masks": masks, "storage": storage, "eval_s": spent,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def given(key: str) -> Any:
    """The piece of the inputs the driver gives (answered by `done`, never run)."""
    raise RuntimeError(f"piece {key} is given by the study's driver, not computed")

"""The streaming engine: one tensor name at a time across base + experts, in chunks.

checkpoints -> plan (names, shapes, what is merged, what is excluded) -> per tensor: read each chunk of
its flat range from every model (positional reads into reused buffers, float32), run the method on it
(sefusion.stream: statistic passes first where the method needs a whole-tensor quantity), cast, and
write the chunk to its place in the planned output shard. Tensors are spread over worker threads.
Memory is bounded by workers x models x chunk plus the methods' chunk temporaries, whatever the model
size; nothing of the output is held.

Data-aware methods (`fisher`, `regmean`) read each expert's statistics of the tensor being merged
(sefusion.stats, one source per expert): the engine hands them over in a StatsContext, tensor by tensor,
and never chunks those tensors (RegMean solves with the whole weight). Fisher's model-wide norm is taken
up front over the merged tensors, so the merge stays one streaming pass.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from ._lazy import torch
from .errors import CheckpointError, OutputExistsError, RecipeError, SefusionError
from .methods._data import FISHER, GRAM, StatisticsError, StatsContext, TensorStats
from .recipe import ModelEntry, Recipe, load_recipe, resolve_params
from .registry import METHODS, MethodSpec
from .stream import Cancelled, StreamContext, spans, stream_tensor

if TYPE_CHECKING:
    from torch import Tensor

    from .io import ModelReader
    from .methods import TensorContext
    from .stats import _StatsSource

log = logging.getLogger("sefusion")


@dataclass
class Plan:
    """What the engine will do with every tensor name, decided before any tensor data is read."""

    merged: list[str]  # merged by the method, in order
    from_base: list[str]  # excluded or non-float: copied from the base
    per_task: list[str]  # excluded tensors that bundles keep per task (present in every expert)


@dataclass
class MergeReport:
    out: Path
    method: str
    tasks: list[str]
    n_merged: int
    n_copied: int
    seconds: float
    notes: list[str]


def _is_float(dtype: Any) -> bool:
    return bool(dtype.is_floating_point)


def _describe(reader: ModelReader, name: str) -> str:
    return str(reader.file_of(name))


def open_inputs(recipe: Recipe, spec: MethodSpec) -> tuple[ModelReader | None, list[ModelReader]]:
    """Open the base (if any) and every expert, failing early with a message naming the folder."""
    from .io import open_model

    base = open_model(recipe.base) if recipe.base else None
    if spec.needs_base and base is None:
        raise RecipeError(f"method '{spec.name}' needs a base model: set `base:` in the recipe")
    experts = [open_model(m.path, base=base) for m in recipe.models]
    return base, experts


def make_plan(
    recipe: Recipe, base: ModelReader | None, experts: Sequence[ModelReader], task_names: Sequence[str]
) -> Plan:
    """Decide per tensor name: merged, copied from the base, or kept per task. Mismatches are errors."""
    ref = base if base is not None else experts[0]
    ref_label = "the base" if base is not None else f"expert '{task_names[0]}'"
    ref_names = ref.names()
    ref_set = set(ref_names)
    merged: list[str] = []
    from_base: list[str] = []
    for name in ref_names:
        if recipe.is_excluded(name) or not _is_float(ref.dtype(name)):
            from_base.append(name)
            continue
        for task, ex in zip(task_names, experts, strict=True):
            if ex is ref:
                continue
            if name not in ex:
                raise CheckpointError(
                    f"tensor '{name}' is in {ref_label} ({_describe(ref, name)}) but missing from expert "
                    f"'{task}' ({ex.path}); add it to `exclude` if it should not be merged"
                )
            if tuple(ex.shape(name)) != tuple(ref.shape(name)):
                raise CheckpointError(
                    f"tensor '{name}' has shape {tuple(ex.shape(name))} in expert '{task}' "
                    f"({_describe(ex, name)}) but {tuple(ref.shape(name))} in {ref_label} "
                    f"({_describe(ref, name)})"
                )
        merged.append(name)
    per_task: list[str] = []
    seen_extra: set[str] = set()
    for task, ex in zip(task_names, experts, strict=True):
        for name in ex.names():
            if name in ref_set or name in seen_extra:
                continue
            if not recipe.is_excluded(name):
                raise CheckpointError(
                    f"tensor '{name}' of expert '{task}' ({_describe(ex, name)}) is not in {ref_label} "
                    f"({ref.path}); add it to `exclude` (a task head, say) or use matching checkpoints"
                )
            missing = [t for t, e in zip(task_names, experts, strict=True) if name not in e]
            if missing:
                raise CheckpointError(
                    f"excluded tensor '{name}' is in expert '{task}' but missing from "
                    f"{', '.join(repr(m) for m in missing)}"
                )
            seen_extra.add(name)
            per_task.append(name)
    excluded_in_ref = [n for n in from_base if recipe.is_excluded(n)]
    # Excluded tensors that the reference also holds are per-task in a bundle as long as every expert has them.
    per_task = [n for n in excluded_in_ref if all(n in e for e in experts)] + per_task
    return Plan(merged=merged, from_base=from_base, per_task=per_task)


# --------------------------------------------------------------------------- statistics (data-aware methods)

ComputeStats = Callable[[ModelEntry, int, frozenset[str]], "str | Path"]


def recipe_statistics(
    recipe: Recipe, spec: MethodSpec, *, compute: ComputeStats | None = None
) -> list[_StatsSource]:
    """One statistics source per model of the recipe, in its order, for a data-aware method.

    `stats:` is opened as it is; `data:` goes through compute(entry, examples, kinds), which returns the
    folder of a statistics store (`sefusion merge` passes sefusion.models.statistics.statistics_for);
    `examples` is the model's `examples:` (else the method's `examples` parameter). A model with neither,
    or with `data:` and no `compute`, is a StatisticsError naming it. The caller closes what is returned.
    """
    from .stats import open_stats

    kinds = spec.statistics
    default = spec.params["examples"].default  # the registry gives every statistics reader `examples`
    out: list[_StatsSource] = []
    try:
        for i, (task, m) in enumerate(zip(recipe.task_names, recipe.models, strict=True)):
            who = f"expert '{task}' (models[{i}])"
            if m.stats is None and m.data is None:
                raise StatisticsError(
                    f"method '{spec.name}' needs the statistics of {who}: give it `data:` (a task name or "
                    "a .jsonl file) or `stats:` (a statistics folder) in the recipe"
                )
            if m.stats is None and compute is None:
                raise StatisticsError(
                    f"the statistics of {who} on `data: {m.data}` are not computed here: `sefusion merge` "
                    "computes them, or pass merge(..., stats=[...]) "
                    "(sefusion.models.statistics.statistics_for, sefusion.stats.open_stats)"
                )
            try:
                if m.stats is not None:
                    folder: str | Path = m.stats
                else:
                    examples = recipe.entry_examples(i) or default
                    folder = compute(m, examples, kinds)  # type: ignore[misc]
                out.append(open_stats(folder))
            except SefusionError as exc:
                raise StatisticsError(f"statistics of {who}: {exc}") from None
    except BaseException:
        close_statistics(out)
        raise
    return out


def close_statistics(sources: Sequence[Any]) -> None:
    """Close the statistics stores among `sources` (in-memory Statistics have nothing to close)."""
    for s in sources:
        close = getattr(s, "close", None)
        if close is not None:
            close()


class StatsFeed:
    """Each expert's statistics of one tensor at a time, for a data-aware method: what a StatsContext
    carries. Checked when built, before any tensor is read: one source per expert, a Fisher for every
    merged tensor (`fisher`), Gram matrices for some merged tensor (`regmean`: stores for another model
    would silently turn it into `linear`). Fisher's model-wide norm is taken over `names`, the merged
    tensors (excluded ones do not count), as `fisher`'s normalize defines it."""

    def __init__(
        self,
        spec: MethodSpec,
        sources: Sequence[_StatsSource | None],
        names: Sequence[str],
        task_names: Sequence[str],
    ) -> None:
        self.kinds = spec.statistics
        self.task_names = tuple(task_names)
        if len(sources) != len(task_names):
            raise StatisticsError(
                f"method '{spec.name}': statistics for {len(sources)} experts, but the recipe has "
                f"{len(task_names)} ({', '.join(self.task_names)})"
            )
        checked: list[_StatsSource] = []
        for i, (task, src) in enumerate(zip(task_names, sources, strict=True)):
            who = f"expert '{task}' (models[{i}])"
            if src is None:
                raise StatisticsError(
                    f"method '{spec.name}': missing statistics for {who}; give it `data:` or `stats:` in the "
                    "recipe, or pass them (sefusion.stats)"
                )
            where = f" ({src.path})" if getattr(src, "path", None) is not None else ""
            if FISHER in self.kinds:
                missing = [n for n in names if not src.has_fisher(n)]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise StatisticsError(
                        f"the statistics of {who}{where} hold no Fisher for tensor '{missing[0]}'{more}; "
                        f"method '{spec.name}' needs one for every merged tensor: recompute them for this "
                        "model, or `exclude` the tensor"
                    )
            if GRAM in self.kinds and names and not any(src.has_gram(n) for n in names):
                held = src.gram_names()
                example = f" (it holds {len(held)}, e.g. '{held[0]}')" if held else " (it holds none)"
                raise StatisticsError(
                    f"the statistics of {who}{where} hold a Gram matrix for none of the merged tensors"
                    f"{example}; were they computed for this model?"
                )
            checked.append(src)
        self.sources = checked
        names = list(names)
        self.norms = [s.fisher_norm(names) if FISHER in self.kinds else None for s in checked]

    def tensor(self, name: str) -> tuple[TensorStats, ...]:
        """Each expert's statistics of tensor `name`, labelled with the recipe's task names."""
        return tuple(
            replace(s.tensor_stats(name, self.kinds, fisher_norm=norm), label=task)
            for s, norm, task in zip(self.sources, self.norms, self.task_names, strict=True)
        )

    def examples(self, kwargs: dict[str, Any], spec: MethodSpec, recipe: Recipe) -> None:
        """Where the recipe sets no `examples` for a model, its statistics' own count is the one expected
        (a `stats:` folder is used as it is); where it does, the method checks the count."""
        arg = spec.params["examples"].arg
        given = kwargs[arg] if isinstance(kwargs[arg], list) else [kwargs[arg]] * len(self.sources)
        kwargs[arg] = [
            v if recipe.entry_examples(i) is not None else s.examples
            for i, (v, s) in enumerate(zip(given, self.sources, strict=True))
        ]


@dataclass(frozen=True)
class StreamStatsContext(StreamContext, StatsContext):
    """The context of a tensor merged by a data-aware method: the stream's, plus each expert's statistics."""


def check_output(out: Path, overwrite: bool) -> None:
    """OUT must not exist unless `overwrite` (checked before any work, and again by the writer)."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")


def _refuse_whole_model(spec: MethodSpec) -> None:
    if spec.kind == "whole_model":
        where = f"{spec.whole_model.__module__}.{spec.whole_model.__qualname__}"  # type: ignore[union-attr]
        raise RecipeError(
            f"method '{spec.name}' is a whole-model method (it ties tensors together), which the "
            f"tensor-by-tensor merge cannot run: {spec.name} runs in the study (`sefusion study`) and from "
            f"Python ({where})"
        )


CHUNK = 1 << 18  # entries per chunk on the CPU: every model's chunk and the temporaries stay in cache
CUDA_CHUNK = 1 << 24  # on a GPU, chunks large enough to keep it busy
PARALLEL_ENTRIES = 1 << 22  # below this many merged entries one thread does it all
WORKERS: int | None = None  # worker threads; None: the usable cores (one below PARALLEL_ENTRIES)


class _Scratch(threading.local):
    """Per-thread buffers, reused from chunk to chunk: no fresh (page-faulted, zeroed) memory per tensor."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, Any], Tensor] = {}

    def get(self, key: Any, n: int, dtype: Any, capacity: int) -> Tensor:
        if n > capacity:  # a whole tensor that a method cannot stream: not kept
            return torch.empty(n, dtype=dtype)
        buf = self.buffers.get((key, dtype))
        if buf is None:
            buf = self.buffers[(key, dtype)] = torch.empty(capacity, dtype=dtype)
        return buf[:n]


class TensorInputs:
    """One tensor name across base + experts, read by chunks of its flat range as the methods take
    them: the base in float32, experts in float32 (float64 kept: the methods subtract in it), on the
    device, checked for NaN/Inf unless allowed."""

    def __init__(self, streamer: Streamer, name: str, *, with_base: bool = True) -> None:
        self.s = streamer
        self.name = name
        ref = streamer.ref
        self.shape = tuple(ref.shape(name))
        self.numel = math.prod(self.shape)
        readers = [streamer.base if with_base else None, *streamer.experts]
        self.models = [(r, r.open_tensor(name) if r is not None else None) for r in readers]
        self._checked: set[int] = set()  # chunk starts already checked for NaN/Inf (in an earlier pass)

    def read(self, start: int, stop: int) -> tuple[Tensor | None, list[Tensor]]:
        check = not self.s.allow_nonfinite and start not in self._checked
        chunks = [self._chunk(slot, start, stop, check) for slot in range(len(self.models))]
        self._checked.add(start)
        if stop - start == self.numel and self.numel > 0:  # the whole tensor: its own shape
            chunks = [None if c is None else c.reshape(self.shape) for c in chunks]
        return chunks[0], chunks[1:]  # type: ignore[return-value]

    def _chunk(self, slot: int, start: int, stop: int, check: bool) -> Tensor | None:
        reader, rng = self.models[slot]
        if reader is None:
            return None
        s, n = self.s, stop - start
        stored = reader.dtype(self.name)
        want = torch.float32 if slot == 0 or stored.itemsize <= 4 else stored
        raw = rng.read(start, stop, s.scratch.get(("raw", slot), n, stored, s.chunk))
        if raw.dtype != want:
            raw = s.scratch.get(("f32", slot), n, want, s.chunk).copy_(raw)
        if check and n and not math.isfinite(float(raw.sum())):
            from .io import check_finite  # a NaN/Inf, or a sum that overflowed: count them exactly

            check_finite(self.name, reader.get(self.name), reader.file_of(self.name))
        return raw if s.device.type == "cpu" else raw.to(s.device)


class Streamer:
    """Everything a merge shares across tensors: the method and its arguments, the inputs, chunking,
    worker threads. `run_tensor` merges one name chunk by chunk; `run` spreads jobs over threads."""

    def __init__(
        self,
        spec: MethodSpec,
        kwargs: Mapping[str, Any],
        weights: Sequence[float],
        base: ModelReader | None,
        experts: Sequence[ModelReader],
        *,
        seed: int,
        task_names: Sequence[str],
        device: Any,
        allow_nonfinite: bool,
        chunk: int | None = None,
        workers: int | None = None,
        stats: StatsFeed | None = None,
    ) -> None:
        self.spec, self.kwargs, self.weights = spec, dict(kwargs), list(weights)
        self.stats = stats
        self.base, self.experts = base, list(experts)
        self.ref = base if base is not None else self.experts[0]
        self.seed, self.task_names = seed, tuple(task_names)
        self.device = torch.device(device)
        self.allow_nonfinite = allow_nonfinite
        self.chunk = chunk or (CHUNK if self.device.type == "cpu" else CUDA_CHUNK)
        self.workers = workers if workers is not None else WORKERS
        self.scratch = _Scratch()
        self.thresholds: Any = None  # each tensor's share of the method's pre-pass result (prepass())

    def inputs(self, name: str) -> TensorInputs:
        return TensorInputs(self, name, with_base=self.spec.needs_base)

    def ranges(self, numel: int) -> list[tuple[int, int]]:
        """Chunks of a merged tensor; starts are multiples of 8 (packed mask bytes) and of the method's
        block size. A method that cannot stream, or that reads statistics, gets the whole tensor."""
        if not self.spec.stream or self.stats is not None:
            return [(0, numel)]
        return spans(numel, self.chunk, math.lcm(8, self.spec.alignment(self.kwargs)))

    def run_tensor(
        self, name: str, emit: Callable[[int, int, Any], None], cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Merge tensor `name`: every chunk's result goes to emit(start, stop, result), in order."""
        spec, kwargs, weights = self.spec, self.kwargs, self.weights
        inputs = self.inputs(name)
        thresholds = None
        if self.thresholds is not None:  # this tensor's share of the model-wide tie budgets, fresh
            thresholds = [t.copy() for t in self.thresholds[name]]
        common = dict(name=name, seed=self.seed, task_names=self.task_names, model_thresholds=thresholds)
        if self.stats is not None:
            ctx: StreamContext = StreamStatsContext(**common, stats=self.stats.tensor(name))
        else:
            ctx = StreamContext(**common)

        def call(base: Tensor | None, experts: Sequence[Tensor], ctx: TensorContext) -> Any:
            return spec.fn(base, list(experts), weights, **kwargs, ctx=ctx)

        stream_tensor(call, ctx, self.ranges(inputs.numel), inputs.read, emit, cancelled)

    def prepass(self, names: Sequence[str], quiet: bool) -> None:
        """The method's model-wide pre-pass (TIES' model-scope thresholds): bounded-memory passes over
        every merged tensor's task vectors, chunk by chunk, before the merge pass."""
        if self.spec.prepass is None:
            return

        def task_vectors(desc: str) -> Iterator[tuple[str, Tensor]]:
            """(name, its task vectors (T, n) float32) of every chunk of every tensor, in order."""
            from .methods import _ops

            bar = _progress(len(names), desc, quiet)
            for name in names:
                inputs = self.inputs(name)
                for start, stop in spans(inputs.numel, self.chunk):
                    base, experts = inputs.read(start, stop)
                    yield name, _ops.task_vectors(base, experts, self.weights, self.spec.name)[0]
                bar.update()
            bar.close()

        self.thresholds = self.spec.prepass(self.kwargs, task_vectors, names, len(self.experts))

    def copy_job(
        self, reader: ModelReader, name: str, dtype: Any, write: Callable[[int, Tensor], None]
    ) -> Job:
        """A job that copies tensor `name` of `reader`, cast to `dtype`, chunk by chunk."""

        def job(cancelled: Callable[[], bool]) -> None:
            rng = reader.open_tensor(name)
            stored = reader.dtype(name)
            for start, stop in spans(math.prod(reader.shape(name)), self.chunk):
                if cancelled():
                    raise Cancelled
                raw = rng.read(start, stop, self.scratch.get("copy", stop - start, stored, self.chunk))
                write(start, raw if stored == dtype else raw.to(dtype))

        return job

    def run(self, jobs: Sequence[Job], total_entries: int, ordered: bool = False) -> None:
        """Run jobs (each one tensor) on worker threads; see run_jobs."""
        workers = self.workers
        if workers is None:
            workers = (
                1 if ordered or total_entries < PARALLEL_ENTRIES or self.device.type != "cpu" else _cores()
            )
        run_jobs(jobs, workers)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for the duration (restored after)."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off while tensors stream: chunks allocate many short-lived objects
    that reference counting frees, and collections triggered by them only walk the heap (a few % of a
    merge's CPU time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_jobs(jobs: Sequence[Job], workers: int) -> None:
    """Run jobs, each one tensor, on `workers` threads, with torch single-threaded inside each: the cores
    work on different tensors instead of meeting at every chunk-sized operation, which costs little on
    an idle machine and a lot on a busy one. The first failure (or Ctrl-C) stops the others at their
    next chunk."""
    with _torch_threads(1), _no_cyclic_gc():
        if workers <= 1:
            for job in jobs:
                job(lambda: False)
            return
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sefusion") as pool:
            futures = [pool.submit(job, stop.is_set) for job in jobs]
            try:
                for f in as_completed(futures):
                    f.result()
            except BaseException:
                stop.set()  # the pool waits for the running jobs, which stop at their next chunk
                for f in futures:
                    f.cancel()
                raise


Job = Callable[[Callable[[], bool]], None]


def _target_dtype(recipe: Recipe, stored: Any) -> Any:
    if recipe.dtype is None or not _is_float(stored):
        return stored
    return getattr(torch, recipe.dtype)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=quiet or None, leave=False)


def _model_card(recipe: Recipe, spec: MethodSpec, extra: str = "") -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [sefusion, merge]\n---\n"
        f"# Merged with sefusion {__version__}\n\n"
        f"Method: `{spec.name}` ({spec.paper}). Tasks: {', '.join(recipe.task_names)}.\n\n"
        f"{extra}"
        "## Recipe\n\n```yaml\n" + recipe.to_yaml() + "```\n"
    )


def merge(
    recipe: Recipe | str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    device: str = "cpu",
    allow_nonfinite: bool = False,
    quiet: bool = True,
    stats: Sequence[_StatsSource | None] | None = None,
) -> MergeReport:
    """Merge the recipe's experts into OUT: a model folder, or a bundle folder for bundle methods.

    Reads one tensor at a time; nothing is written to OUT unless the whole merge succeeds. A data-aware
    method (`fisher`, `regmean`) reads `stats`, one source per model in recipe order (sefusion.stats:
    Statistics or open_stats(folder)); without it, the models' `stats:` folders are opened (`data:`
    needs its statistics computed first: `sefusion merge` does that, see `recipe_statistics`).
    """
    import time

    from .io import parse_size

    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        src = recipe if isinstance(recipe, (str, Path)) else dict(recipe)
        recipe = load_recipe(src, require_data=stats is None)
    out = Path(out)
    spec = METHODS.get(recipe.method)
    _refuse_whole_model(spec)
    task_names = recipe.task_names
    kwargs = resolve_params(recipe, spec)
    spec.bind(kwargs, task_names)
    weights = [m.weight for m in recipe.models]
    size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    dev = _check_device(device)
    check_output(out, overwrite)

    opened: list[_StatsSource] = []
    if spec.statistics and stats is None:
        stats = opened = recipe_statistics(recipe, spec)
    try:
        base, experts = open_inputs(recipe, spec)
        try:
            plan = make_plan(recipe, base, experts, task_names)
            feed = None
            if spec.statistics:
                feed = StatsFeed(spec, stats or [], plan.merged, task_names)
                feed.examples(kwargs, spec, recipe)
            streamer = Streamer(
                spec, kwargs, weights, base, experts, seed=recipe.seed, task_names=task_names,
                device=dev, allow_nonfinite=allow_nonfinite, stats=feed,
            )  # fmt: skip
            if spec.kind == "bundle":
                from .bundle import write_bundle

                write_bundle(
                    out, recipe, spec, kwargs, plan, streamer, overwrite=overwrite, shard_size=size,
                    quiet=quiet,
                )  # fmt: skip
            else:
                _write_merge(out, recipe, spec, plan, streamer, size, overwrite, quiet)
        finally:
            for r in [base, *experts]:
                if r is not None:
                    r.close()
    finally:
        close_statistics(opened)
    return MergeReport(
        out=out,
        method=spec.name,
        tasks=list(task_names),
        n_merged=len(plan.merged),
        n_copied=len(plan.from_base),
        seconds=time.perf_counter() - t0,
        notes=list(recipe.notes),
    )


def _check_device(device: str) -> Any:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SefusionError(f"unknown device '{device}'; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SefusionError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def _write_merge(
    out: Path,
    recipe: Recipe,
    spec: MethodSpec,
    plan: Plan,
    streamer: Streamer,
    shard_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    from .io import ModelWriter

    ref = streamer.ref
    streamer.prepass(plan.merged, quiet)
    only_in_experts = [n for n in plan.per_task if n not in ref]
    if only_in_experts:
        log.warning(
            "excluded tensors held only by the experts are left out of the merged model (a bundle method "
            "keeps them per task): %s",
            ", ".join(only_in_experts[:8]) + (" ..." if len(only_in_experts) > 8 else ""),
        )
    card = _model_card(recipe, spec)
    layout = sorted(
        (name, ref.shape(name), _target_dtype(recipe, ref.dtype(name)))
        for name in plan.merged + plan.from_base
    )
    with ModelWriter(
        out, overwrite=overwrite, shard_size=shard_size, aux_from=ref, model_card=card, layout=layout
    ) as w:
        bar = _progress(len(plan.merged) + len(plan.from_base), f"{spec.name}", quiet)

        def merge_job(name: str) -> Job:
            dtype = _target_dtype(recipe, ref.dtype(name))

            def emit(start: int, stop: int, result: Tensor) -> None:
                flat = result.reshape(-1)
                cast = streamer.scratch.get("out", stop - start, dtype, streamer.chunk)
                w.write_range(name, start, cast.copy_(flat))

            def job(cancelled: Callable[[], bool]) -> None:
                streamer.run_tensor(name, emit, cancelled)
                bar.update()

            return job

        def copy_job(name: str) -> Job:
            copy = streamer.copy_job(
                ref, name, _target_dtype(recipe, ref.dtype(name)), partial(w.write_range, name)
            )

            def job(cancelled: Callable[[], bool]) -> None:
                copy(cancelled)
                bar.update()

            return job

        ordered = streamer.thresholds is not None
        names = plan.merged if ordered else sorted(plan.merged, key=lambda n: -math.prod(ref.shape(n)))
        jobs = [merge_job(n) for n in names] + [copy_job(n) for n in plan.from_base]
        entries = sum(math.prod(ref.shape(n)) for n in plan.merged)
        streamer.run(jobs, entries, ordered=ordered)
        bar.close()
        w.commit()


def merge_tensors(
    method: str,
    base: Mapping[str, Tensor] | None,
    experts: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    task_names: Sequence[str] | None = None,
    seed: int = 0,
    per_expert: Sequence[Mapping[str, Any]] | None = None,
    stats: Sequence[_StatsSource] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Merge in-memory tensor dicts with `method` (same maths as `merge`, no files).

    Returns {name: tensor} for merge methods and {name: BundleTensor} for bundle methods. Every
    tensor name of the first expert is merged; all dicts must hold the same names and shapes. A
    data-aware method (`fisher`, `regmean`) reads `stats`, one source per expert
    (sefusion.stats.merge_tensors_with_stats does the work).
    """
    spec = METHODS.get(method)
    _refuse_whole_model(spec)
    if spec.statistics:
        from .stats import merge_tensors_with_stats

        if stats is None:
            raise StatisticsError(
                f"method '{method}' needs each expert's statistics: pass stats=[...] (sefusion.stats)"
            )
        return merge_tensors_with_stats(
            method, experts, stats, weights, base=base, task_names=task_names, seed=seed,
            per_expert=per_expert, **params,
        )  # fmt: skip
    if not experts:
        raise RecipeError("merge_tensors needs at least one expert")
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise RecipeError(f"{len(names)} task names for {len(experts)} experts")
    kwargs = spec.resolve(params, list(per_expert) if per_expert else None, where="merge_tensors")
    spec.bind(kwargs, names)
    if spec.needs_base and base is None:
        raise RecipeError(f"method '{method}' needs a base")
    w = list(weights) if weights is not None else [1.0] * len(experts)
    keys = list(experts[0])
    for i, ex in enumerate(experts):
        for k in keys:
            if k not in ex:
                raise CheckpointError(f"tensor '{k}' is missing from expert '{names[i]}'")
            if tuple(ex[k].shape) != tuple(experts[0][k].shape):
                raise CheckpointError(
                    f"tensor '{k}' has shape {tuple(ex[k].shape)} in expert '{names[i]}' but "
                    f"{tuple(experts[0][k].shape)} in expert '{names[0]}'"
                )
        if base is not None and k not in base:
            raise CheckpointError(f"tensor '{k}' is missing from the base")
    thresholds = None
    if spec.prepass is not None:

        def task_vectors(desc: str) -> Iterator[tuple[str, Tensor]]:
            for k in keys:
                b = base[k].float() if base is not None else None
                yield (
                    k,
                    torch.stack(
                        [
                            (ex[k].float() - b if b is not None else ex[k].float()).reshape(-1)
                            for ex in experts
                        ]
                    ),
                )

        thresholds = spec.prepass(kwargs, task_vectors, keys, len(experts))
    result: dict[str, Any] = {}

    def job(k: str) -> Job:
        def run(cancelled: Callable[[], bool]) -> None:
            result[k] = _merge_in_memory(
                spec, kwargs, w, k, base[k] if base is not None else None, [ex[k] for ex in experts],
                seed=seed, task_names=names, thresholds=thresholds[k] if thresholds else None, cancelled=cancelled,
            )  # fmt: skip

        return run

    entries = sum(experts[0][k].numel() for k in keys)
    parallel = thresholds is None and entries >= PARALLEL_ENTRIES
    run_jobs([job(k) for k in keys], (WORKERS or _cores()) if parallel else 1)
    return {k: result[k] for k in keys}


def _merge_in_memory(
    spec: MethodSpec,
    kwargs: Mapping[str, Any],
    weights: list[float],
    name: str,
    base: Tensor | None,
    experts: list[Tensor],
    *,
    seed: int,
    task_names: Sequence[str],
    thresholds: Any,
    cancelled: Callable[[], bool] = lambda: False,
) -> Any:
    """One tensor of merge_tensors, through the same chunked stream as a merge from files."""
    from .methods import BundleTensor

    shape = tuple(experts[0].shape)
    n = math.prod(shape)

    def piece(t: Tensor, start: int, stop: int, *, is_base: bool = False) -> Tensor:
        flat = t.detach().to("cpu").reshape(-1)[start:stop]
        if flat.is_floating_point() and (is_base or flat.dtype.itemsize <= 4):
            flat = flat.to(torch.float32)  # as from files: the base in float32, experts too unless wider
        return flat.reshape(shape) if stop - start == n and n > 0 else flat

    def read(start: int, stop: int) -> tuple[Tensor | None, list[Tensor]]:
        b = piece(base, start, stop, is_base=True) if base is not None else None
        return b, [piece(e, start, stop) for e in experts]

    def call(b: Tensor | None, xs: Sequence[Tensor], ctx: TensorContext) -> Any:
        return spec.fn(b, list(xs), weights, **kwargs, ctx=ctx)

    if spec.kind == "bundle":
        vector = torch.empty(n, dtype=torch.float32)
        masks = torch.empty((len(experts), n), dtype=torch.bool)
        scales: list[Any] = [None]
    else:
        out = torch.empty(n, dtype=experts[0].dtype)

    def emit(start: int, stop: int, res: Any) -> None:
        if spec.kind == "bundle":
            vector[start:stop] = res.vector.reshape(-1)
            masks[:, start:stop] = res.masks.reshape(len(experts), -1)
            scales[0] = res.scales
        else:
            out[start:stop] = res.reshape(-1)

    ctx = StreamContext(name=name, seed=seed, task_names=tuple(task_names), model_thresholds=thresholds)
    align = math.lcm(8, spec.alignment(kwargs))
    ranges = spans(n, CHUNK, align) if spec.stream else [(0, n)]
    stream_tensor(call, ctx, ranges, read, emit, cancelled)
    if spec.kind == "bundle":
        return BundleTensor(vector.reshape(shape), masks.reshape(len(experts), *shape), scales[0])
    return out.reshape(shape)

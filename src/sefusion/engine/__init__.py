"""The merge engine: recipe -> plan -> stream -> sink, one tensor name at a time.

* `plan`: inputs opened, every tensor name's fate decided (merged, copied, kept per task) before any
  tensor data is read; * `statistics`: each expert's statistics for a data-aware method, opened here and
  only here; * `stream`: chunks of each tensor read from every model into reused buffers, the method
  run on them, jobs on worker threads; * `sinks`: a model folder, a bundle folder or a dict in memory.

Two public entries: `merge` (checkpoint folders in, a folder out) and `merge_tensors` (tensor dicts in,
a dict out). Both run `run_merge`, the one merge loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import CheckpointError, RecipeError
from ..methods._data import StatisticsError
from ..progress import progress
from ..recipe import Recipe, load_recipe, resolve_params
from ..registry import METHODS, MethodSpec
from .plan import Plan, check_device, check_output, make_plan, open_inputs, refuse_whole_model
from .sinks import BundleSink, MemorySink, ModelSink, Sink
from .statistics import ComputeStats, StatsFeed, close_statistics, open_statistics, recipe_statistics
from .stream import Job, MemoryReader, Streamer

if TYPE_CHECKING:
    from torch import Tensor

    from ..io import ModelReader
    from ..stats import _StatsSource

__all__ = [
    "MergeReport",
    "Plan",
    "StatsFeed",
    "Streamer",
    "check_output",
    "close_statistics",
    "make_plan",
    "merge",
    "merge_tensors",
    "merge_tensors_with_stats",
    "recipe_statistics",
    "run_merge",
]


@dataclass
class MergeReport:
    out: Path
    method: str
    tasks: list[str]
    n_merged: int
    n_copied: int
    seconds: float
    notes: list[str]


def run_merge(streamer: Streamer, names: Sequence[str], sink: Sink, quiet: bool) -> None:
    """The merge loop: the method's pre-pass, then every merged tensor streamed chunk by chunk into the
    sink and every copied tensor copied, as jobs on worker threads (largest tensors first, unless a
    pre-pass result must be consumed in order)."""
    streamer.prepass(names, quiet)
    copies = sink.copies()
    bar = progress(len(names) + len(copies), streamer.spec.name, quiet)

    def merge_job(name: str) -> Job:
        def job(cancelled: Callable[[], bool]) -> None:
            streamer.run_tensor(name, partial_write(sink, name), cancelled)
            sink.done(name)
            bar.update()

        return job

    def copy_job(copy: Any) -> Job:
        run = streamer.copy_job(*copy)

        def job(cancelled: Callable[[], bool]) -> None:
            run(cancelled)
            bar.update()

        return job

    ref = streamer.ref
    ordered = streamer.thresholds is not None
    order = list(names) if ordered else sorted(names, key=lambda n: -math.prod(ref.shape(n)))
    jobs = [merge_job(n) for n in order] + [copy_job(c) for c in copies]
    streamer.run(jobs, sum(math.prod(ref.shape(n)) for n in names), ordered=ordered)
    bar.close()
    sink.commit()


def partial_write(sink: Sink, name: str) -> Callable[[int, int, Any], None]:
    def emit(start: int, stop: int, result: Any) -> None:
        sink.write(name, start, stop, result)

    return emit


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
    compute_stats: ComputeStats | None = None,
) -> MergeReport:
    """Merge the recipe's experts into OUT: a model folder, or a bundle folder for bundle methods.

    Reads one tensor at a time; nothing is written to OUT unless the whole merge succeeds. A data-aware
    method (`fisher`, `regmean`) reads `stats`, one source per model in recipe order (sefusion.stats:
    Statistics or open_stats(folder)); without it, the models' `stats:` folders are opened, and `data:`
    goes through compute_stats(entry, examples, kinds, names) once the plan knows the merged tensors
    (`names`; `sefusion merge` passes one that computes them).
    """
    from ..io import parse_size

    t0 = time.perf_counter()
    recipe, src = _as_recipe(recipe, require_data=stats is None)
    out = Path(out)
    spec = METHODS.get(recipe.method)
    refuse_whole_model(spec)
    kwargs = resolve_params(recipe, spec)
    spec.bind(kwargs, recipe.task_names)
    size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    dev = check_device(device)
    check_output(out, overwrite, [*recipe.input_paths(), *([src] if src is not None else [])])

    def statistics(names: Sequence[str]) -> tuple[Sequence[Any] | None, list[Any]]:
        return open_statistics(recipe, spec, stats, compute_stats, names)

    plan = _merge_files(recipe, spec, kwargs, out, statistics, dev, allow_nonfinite, size, overwrite, quiet)
    return MergeReport(
        out=out, method=spec.name, tasks=list(recipe.task_names), n_merged=len(plan.merged),
        n_copied=len(plan.from_base), seconds=time.perf_counter() - t0, notes=list(recipe.notes),
    )  # fmt: skip


def _as_recipe(
    recipe: Recipe | str | Path | Mapping[str, Any], *, require_data: bool
) -> tuple[Recipe, str | Path | None]:
    """The recipe validated, and the file it came from (an input OUT must stay apart from)."""
    if isinstance(recipe, Recipe):
        return recipe, None
    src = recipe if isinstance(recipe, (str, Path)) else dict(recipe)
    return load_recipe(src, require_data=require_data), src if isinstance(src, (str, Path)) else None


def _merge_files(
    recipe: Recipe,
    spec: MethodSpec,
    kwargs: dict[str, Any],
    out: Path,
    statistics: Callable[[Sequence[str]], tuple[Sequence[Any] | None, list[Any]]],
    device: Any,
    allow_nonfinite: bool,
    size: int,
    overwrite: bool,
    quiet: bool,
) -> Plan:
    """Open the inputs, plan, open the statistics of the merged tensors (`statistics(names)`: the sources,
    those to close), and run the merge loop into a model or bundle sink; the plan it ran."""
    from ..io.checks import check_inputs

    task_names = recipe.task_names
    base, experts = open_inputs(recipe, spec)
    opened: list[Any] = []
    try:
        # a data-aware merge reads statistics only where some adapter acts (Fisher and RegMean of T equal
        # tensors are that tensor); a data-free one merges every tensor, as mergekit does
        plan = make_plan(recipe, base, experts, task_names, copy_untouched=bool(spec.statistics))
        check_inputs(
            recipe, base or experts[0], experts, plan.merged, configs_of_experts=spec.kind == "bundle"
        )
        feed = None
        if spec.statistics:
            sources, opened = statistics(plan.merged)
            feed = StatsFeed(spec, sources or [], plan.merged, task_names)
            feed.examples(kwargs, spec, recipe)
        streamer = Streamer(
            spec, kwargs, [m.weight for m in recipe.models], base, experts, seed=recipe.seed,
            task_names=task_names, device=device, allow_nonfinite=allow_nonfinite, stats=feed,
        )  # fmt: skip
        kind = BundleSink if spec.kind == "bundle" else ModelSink
        with kind.open(out, recipe, spec, plan, streamer, size, overwrite) as w:
            sink = BundleSink(w, recipe, spec, kwargs, plan, streamer) if kind is BundleSink else None
            run_merge(streamer, plan.merged, sink or ModelSink(w, recipe, plan, streamer), quiet)
        return plan
    finally:
        try:
            close_statistics(opened)
        finally:
            for r in [base, *experts]:
                if r is not None:
                    r.close()


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
    """Merge in-memory tensor dicts with `method` (same maths and same loop as `merge`, no files).

    Returns {name: tensor} for merge methods and {name: BundleTensor} for bundle methods. Every
    tensor name of the first expert is merged; all dicts must hold the same names and shapes. A
    data-aware method (`fisher`, `regmean`) reads `stats`, one source per expert (sefusion.stats).
    """
    spec = METHODS.get(method)
    refuse_whole_model(spec)
    if spec.statistics and stats is None:
        raise StatisticsError(
            f"method '{method}' needs each expert's statistics: pass stats=[...] (sefusion.stats)"
        )
    if not experts:
        raise RecipeError("merge_tensors needs at least one expert")
    names = list(task_names) if task_names is not None else _default_names(spec, experts, stats)
    if len(names) != len(experts):
        raise RecipeError(f"{len(names)} task names for {len(experts)} experts")
    kwargs = spec.resolve(params, list(per_expert) if per_expert else None, where="merge_tensors")
    spec.bind(kwargs, names)
    if spec.needs_base and base is None:
        raise RecipeError(f"method '{method}' needs a base")
    keys = _check_memory(base, experts, names)
    feed = StatsFeed(spec, stats, keys, names) if spec.statistics and stats is not None else None
    streamer = _memory_streamer(spec, kwargs, weights, base, experts, seed, names, feed)
    sink = MemorySink(spec, experts, keys)
    run_merge(streamer, keys, sink, quiet=True)
    return {k: sink.out[k] for k in keys}


def _memory_streamer(
    spec: MethodSpec,
    kwargs: dict[str, Any],
    weights: Sequence[float] | None,
    base: Mapping[str, Tensor] | None,
    experts: Sequence[Mapping[str, Tensor]],
    seed: int,
    names: list[str],
    feed: StatsFeed | None,
) -> Streamer:
    """A streamer over in-memory tensors: no NaN/Inf check (the caller's tensors), CPU; a data-aware
    merge runs inline (see Streamer.run)."""
    # MemoryReader has the part of the ModelReader interface that the stream reads
    readers = [cast("ModelReader", MemoryReader(ex)) for ex in experts]
    mem_base = cast("ModelReader", MemoryReader(base)) if base is not None and spec.needs_base else None
    return Streamer(
        spec, kwargs, list(weights) if weights is not None else [1.0] * len(experts), mem_base, readers,
        seed=seed, task_names=names, device="cpu", allow_nonfinite=True, stats=feed, inline=feed is not None,
    )  # fmt: skip


def _default_names(spec: MethodSpec, experts: Sequence[Any], stats: Sequence[Any] | None) -> list[str]:
    """Task names when none are given: the statistics' own labels, else task0, task1, ..."""
    if spec.statistics and stats is not None and len(stats) == len(experts):
        return [s.label for s in stats]
    return [f"task{i}" for i in range(len(experts))]


def _check_memory(
    base: Mapping[str, Tensor] | None, experts: Sequence[Mapping[str, Tensor]], names: Sequence[str]
) -> list[str]:
    """Every tensor name of the first expert, checked in every expert (same shape) and in the base."""
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
    return keys


def merge_tensors_with_stats(
    method: str,
    experts: Sequence[Mapping[str, Tensor]],
    stats: Sequence[_StatsSource],
    weights: Sequence[float] | None = None,
    *,
    base: Mapping[str, Tensor] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """merge_tensors for a data-aware method, the statistics second (one source per expert)."""
    return merge_tensors(method, base, experts, weights, stats=stats, **kwargs)

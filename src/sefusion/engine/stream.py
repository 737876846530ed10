"""Reading and running: one tensor name at a time across base + experts, in chunks of its flat range
(positional reads into reused per-thread buffers, float32), the method run on each chunk (statistic
passes first where it needs a whole-tensor quantity), jobs spread over worker threads. Memory is bounded
by workers x models x chunk plus the methods' chunk temporaries, whatever the model size."""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..methods._data import StatsContext
from ..progress import progress
from ..registry import MethodSpec
from ..stream import Cancelled, StreamContext, spans, stream_tensor

if TYPE_CHECKING:
    from torch import Tensor

    from ..io import ModelReader
    from ..methods import TensorContext
    from .statistics import StatsFeed


@dataclass(frozen=True)
class StreamStatsContext(StreamContext, StatsContext):
    """The context of a tensor merged by a data-aware method: the stream's, plus each expert's statistics."""


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
        wide = not stored.is_floating_point or (slot > 0 and stored.itemsize > 4)  # kept as stored
        want = stored if wide else torch.float32
        raw = rng.read(start, stop, s.scratch.get(("raw", slot), n, stored, s.chunk))  # type: ignore[union-attr]
        if raw.dtype != want:
            raw = s.scratch.get(("f32", slot), n, want, s.chunk).copy_(raw)
        if check and n and not math.isfinite(float(raw.sum())):
            from ..io import check_finite  # a NaN/Inf, or a sum that overflowed: count them exactly

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
        inline: bool = False,
    ) -> None:
        self.spec, self.kwargs, self.weights = spec, dict(kwargs), list(weights)
        self.stats = stats
        self.inline = inline  # jobs in the caller's thread, with its torch threads (see run)
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
        common: dict[str, Any] = dict(
            name=name, seed=self.seed, task_names=self.task_names, model_thresholds=thresholds
        )
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
            from ..methods import _ops

            bar = progress(len(names), desc, quiet)
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
        """Run jobs (each one tensor) on worker threads; see run_jobs. Inline: one after the other in the
        caller's thread with its own torch intra-op threads (a data-aware merge of in-memory tensors:
        RegMean's solves are BLAS-bound, and their bits depend on the thread count)."""
        if self.inline:
            for job in jobs:
                job(lambda: False)
            return
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


class MemoryReader:
    """In-memory tensors ({name: tensor}) behind the part of the ModelReader interface the stream reads,
    so that merge_tensors runs the very loop that merges files."""

    path = None

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._flat = {k: v.detach().to("cpu").reshape(-1) for k, v in tensors.items()}
        self._shape = {k: tuple(v.shape) for k, v in tensors.items()}

    def names(self) -> list[str]:
        return list(self._flat)

    def __contains__(self, name: object) -> bool:
        return name in self._flat

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> Any:
        return self._flat[name].dtype

    def open_tensor(self, name: str) -> MemoryReader._Range:
        return MemoryReader._Range(self._flat[name])

    class _Range:
        def __init__(self, flat: Tensor) -> None:
            self.flat = flat

        def read(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
            return self.flat[start:stop]  # a view: the methods never write to their inputs

"""A study's work as a DAG of named pieces, run in process (LocalExecutor) or on a Ray cluster (RayExecutor).

A `Piece` is a key, a function with its arguments, the keys of the pieces whose results it takes, and the
resources it needs. `fn(*args, *[result of each dep, in deps order], **kwargs)` computes its result. Both
executors share one contract:

- `done(key)` is asked for every piece before anything runs; a piece it answers (not None) is skipped and
  its answer stands for its result (the study answers from its cache and evaluation records). A piece's
  result must therefore never be None.
- `on_done(key, result)` is called on the calling process (the driver) as each piece finishes: the study
  writes its records there, so the driver is their only writer and an interrupted run resumes on any
  executor without running a piece twice.
- `run()` returns every piece's result (the skipped ones included) in the order the pieces were given, so
  the results do not depend on the executor or on the order pieces happened to finish.
- A piece that raises fails the run with that exception, on Ray as in process (not a Ray stack dump).
- The heap's freed pages go back to the system after a piece that left the process's private memory
  `TRIM_GROWTH` above the smallest it has been since the last trim (`after_piece`), so a piece starts
  within that of what the process still holds, not from the peak of the one before.

Ray is imported by RayExecutor only: without it nothing here needs more than the standard library and tqdm.
"""

from __future__ import annotations

import heapq
import logging
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..errors import SefusionError
from ..heap import private_resident_bytes, release_freed_memory

log = logging.getLogger(__name__)

Done = Callable[[str], Any]
OnDone = Callable[[str, Any], None]


TRIM_GROWTH = 512 << 20  # bytes: a process grown by less is not worth a gc pass


class _HeapTrim:
    """Trims the heap after a piece that left the process's private memory TRIM_GROWTH above the smallest
    it has been since the last trim. The gc pass of a trim walks every live object: about 0.1 s in a test
    process, paid by each of a study's hundreds of small pieces, it made the study tests 4 times slower;
    the pieces that leave gigabytes behind (a LoRA training, a statistics pass) are the ones the trim is
    for."""

    def __init__(self) -> None:
        self.floor: int | None = None  # private resident bytes: after the last trim, or the least since

    def __call__(self) -> None:
        now = private_resident_bytes()
        if now is not None and self.floor is not None and now < self.floor + TRIM_GROWTH:
            self.floor = min(self.floor, now)
            return
        release_freed_memory()
        self.floor = private_resident_bytes()


after_piece = _HeapTrim()


class PieceLostError(SefusionError):
    """The cluster lost a piece more often than it retries (its worker or node died each time)."""


@dataclass(frozen=True)
class Piece:
    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    deps: tuple[str, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_cpus: float = 1
    num_gpus: float = 0

    def __call__(self, *dep_results: Any) -> Any:
        return self.fn(*self.args, *dep_results, **self.kwargs)


class Executor(Protocol):
    in_process: ClassVar[bool]  # pieces compute in the caller's process (else with their own resources)

    def run(
        self, pieces: Sequence[Piece], *, done: Done | None = None, on_done: OnDone | None = None
    ) -> dict[str, Any]: ...

    def session(self, total: int | None = None) -> Any: ...  # a context manager over several run()s


class Plan:
    """Which pieces are waiting for inputs, ready, running or done; ready ones come out in the given order."""

    def __init__(self, pieces: Sequence[Piece], done: Done | None = None) -> None:
        self.pieces = _validated(pieces)
        self.index = {p.key: i for i, p in enumerate(self.pieces)}
        self.results: dict[str, Any] = {}
        for p in self.pieces:
            found = done(p.key) if done is not None else None
            if found is not None:
                self.results[p.key] = found
        self.skipped = len(self.results)
        self.missing = {p.key: {d for d in p.deps if d not in self.results} for p in self.pieces}
        self.dependents: dict[str, list[str]] = {p.key: [] for p in self.pieces}
        for p in self.pieces:
            for d in set(p.deps):
                self.dependents[d].append(p.key)
        self.ready: list[int] = []
        self.running: set[str] = set()
        for p in self.pieces:
            if p.key not in self.results and not self.missing[p.key]:
                heapq.heappush(self.ready, self.index[p.key])

    def pop_ready(self, limit: int | None = None) -> list[Piece]:
        """Pieces whose inputs are all available (at most `limit`), marked running, in the given order."""
        n = len(self.ready) if limit is None else min(limit, len(self.ready))
        out = [self.pieces[heapq.heappop(self.ready)] for _ in range(n)]
        self.running.update(p.key for p in out)
        return out

    def finish(self, key: str, result: Any) -> None:
        if result is None:
            raise TypeError(f"piece {key} returned None: a piece's result must not be None")
        self.running.discard(key)
        self.results[key] = result
        for k in self.dependents[key]:
            self.missing[k].discard(key)
            if not self.missing[k] and k not in self.results and k not in self.running:
                heapq.heappush(self.ready, self.index[k])

    @property
    def finished(self) -> bool:
        return len(self.results) == len(self.pieces)

    def counts(self) -> tuple[int, int, int]:
        """(done, running, waiting): waiting is every piece not yet started, ready or not."""
        done, running = len(self.results), len(self.running)
        return done, running, len(self.pieces) - done - running

    def ordered(self) -> dict[str, Any]:
        return {p.key: self.results[p.key] for p in self.pieces}


def _validated(pieces: Sequence[Piece]) -> list[Piece]:
    """The pieces as a list, once their keys are unique, their deps known and free of cycles."""
    pieces = list(pieces)
    keys = {p.key: p for p in pieces}
    if len(keys) < len(pieces):
        twice = sorted({p.key for p in pieces if sum(q.key == p.key for q in pieces) > 1})
        raise ValueError(f"two pieces have the key {twice[0]!r}")
    for p in pieces:
        unknown = [d for d in p.deps if d not in keys]
        if unknown:
            raise ValueError(f"piece {p.key!r} depends on unknown piece(s) {', '.join(map(repr, unknown))}")
    missing = {p.key: set(p.deps) for p in pieces}  # Kahn: peel off pieces whose deps are all peeled
    dependents: dict[str, list[str]] = {k: [] for k in keys}
    for k, m in missing.items():
        for d in m:
            dependents[d].append(k)
    free = [k for k, m in missing.items() if not m]
    while free:
        k = free.pop()
        del missing[k]
        for other in dependents[k]:
            missing[other].discard(k)
            if not missing[other]:
                free.append(other)
    if missing:
        raise ValueError(f"pieces depend on each other in a cycle: {', '.join(map(repr, sorted(missing)))}")
    return pieces


class _Progress:
    """One tqdm bar over all pieces: done / running / waiting. A session that announces its total keeps
    one bar over all its run()s: the pieces of the runs still to come count as waiting."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="piece", disable=quiet)
        self.before = 0  # pieces of the runs that have ended
        self.plan: Plan | None = None

    def start(self, plan: Plan, desc: str) -> None:
        self.plan = plan
        self.bar.set_description_str(desc, refresh=False)
        self.bar.total = max(self.bar.total, self.before + len(plan.pieces))  # more than announced
        self.show()

    def show(self) -> None:
        assert self.plan is not None
        done, running, _ = self.plan.counts()
        self.bar.n = self.before + done
        waiting = self.bar.total - self.bar.n - running
        self.bar.set_postfix_str(f"running {running}, waiting {waiting}", refresh=True)

    def end(self) -> None:
        assert self.plan is not None
        self.before += len(self.plan.pieces)

    def close(self) -> None:
        self.bar.close()


class _Bars:
    """The bar of each run(): the session's when it announced a total, else one of the run's own."""

    quiet: bool
    _session_bar: _Progress | None

    @contextmanager
    def _bar(self, plan: Plan, desc: str) -> Iterator[_Progress]:
        own = self._session_bar is None
        progress = _Progress(len(plan.pieces), quiet=self.quiet) if own else self._session_bar
        assert progress is not None
        progress.start(plan, desc)
        try:
            yield progress
        finally:
            progress.end()
            if own:
                progress.close()

    @contextmanager
    def _session_progress(self, total: int | None) -> Iterator[None]:
        """One bar for the session's runs when `total` is given; log lines print above it meanwhile."""
        if total is None:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._session_bar = _Progress(total, quiet=self.quiet)
        try:
            with logging_redirect_tqdm():
                yield
        finally:
            self._session_bar.close()
            self._session_bar = None


@dataclass
class LocalExecutor(_Bars):
    """Runs the pieces one after another in this process, in the order given wherever their deps allow."""

    quiet: bool = False
    desc: str = "pieces"
    in_process: ClassVar[bool] = True  # pieces compute in the caller's process, with its threads
    _session_bar: _Progress | None = field(default=None, init=False, repr=False)

    def run(
        self, pieces: Sequence[Piece], *, done: Done | None = None, on_done: OnDone | None = None
    ) -> dict[str, Any]:
        plan = Plan(pieces, done)
        with self._bar(plan, self.desc) as progress:
            while not plan.finished:
                [piece] = plan.pop_ready(limit=1)  # one at a time: the first ready one in the given order
                progress.show()
                result = piece(*(plan.results[d] for d in piece.deps))
                after_piece()
                plan.finish(piece.key, result)
                if on_done is not None:
                    on_done(piece.key, result)
                progress.show()
        return plan.ordered()

    @contextmanager
    def session(self, total: int | None = None) -> Iterator[None]:
        """Several run()s; with `total` (the pieces they will hold), one progress bar over all of them."""
        with self._session_progress(total):
            yield


def make_executor(ray: str | bool | None = None, *, quiet: bool = False) -> Executor:
    """`--ray [ADDRESS]` as an executor: None/False in process, True/"" a local Ray instance, else ADDRESS."""
    if ray is None or ray is False:
        return LocalExecutor(quiet=quiet)
    return RayExecutor(address=None if ray is True or ray == "" else str(ray), quiet=quiet)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], *deps: Any) -> Any:
    """What a Ray worker runs for a piece (module level, so workers import it rather than unpickle code)."""
    try:
        return fn(*args, *deps, **kwargs)
    finally:
        after_piece()


@dataclass
class RayExecutor(_Bars):
    """Runs each piece as a Ray task with its resources, submitted as soon as its inputs are ready.

    `address` None starts a local Ray instance (unless this process is already connected: then that
    connection is used and left open); otherwise it is a cluster's address (`ray start --head` prints it;
    "auto" finds the one on this machine). Results come back through this process, which calls `on_done`.
    A piece whose worker or node dies is run again by Ray up to `max_retries` times; one that raises is not.
    """

    address: str | None = None
    max_retries: int = 3
    quiet: bool = False
    desc: str = "pieces"
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed on to ray.init
    in_process: ClassVar[bool] = False
    _held: bool = field(default=False, init=False, repr=False)  # inside session(): keep a connection open
    _owned: bool = field(default=False, init=False, repr=False)  # a connection this session made
    _session_bar: _Progress | None = field(default=None, init=False, repr=False)

    @contextmanager
    def session(self, total: int | None = None) -> Iterator[None]:
        """Several run()s on one connection: made by the first run that needs the cluster, closed at
        the end (a connection this process had before is left open). A missing ray package or an
        address nothing answers on is refused at once, before any work. With `total` (the pieces the
        runs will hold), one progress bar over all of them."""
        ray = _import_ray()
        if self.address is not None and not ray.is_initialized():
            _reachable(self.address)
        self._held = True
        try:
            with self._session_progress(total):
                yield
        finally:
            self._held = False
            if self._owned:
                self._owned = False
                _import_ray().shutdown()

    def run(
        self, pieces: Sequence[Piece], *, done: Done | None = None, on_done: OnDone | None = None
    ) -> dict[str, Any]:
        ray = _import_ray()
        plan = Plan(pieces, done)
        if plan.finished:  # everything is in the records: no cluster needed
            return plan.ordered()
        started = self._connect(ray)
        if started and self._held:  # the session closes it
            self._owned, started = True, False
        try:
            _check_resources(ray, plan)
            return self._drive(ray, plan, on_done)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local instance); False when this process was connected already."""
        if ray.is_initialized():
            return False
        # worker output would tear the progress bar apart; it stays in the cluster's log folder
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address is None:
            kwargs["include_dashboard"] = False
        kwargs.update(self.init_kwargs)
        if self.address is not None:
            _reachable(self.address)
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"at {self.address}" if self.address else "on this machine"
            raise SefusionError(f"cannot start or reach a Ray cluster {where}: {_first_line(exc)}") from None
        return True

    def _drive(self, ray: Any, plan: Plan, on_done: OnDone | None) -> dict[str, Any]:
        remote = ray.remote(_call)
        inputs = _Inputs(ray, plan)
        running: dict[Any, str] = {}  # ObjectRef -> key
        with self._bar(plan, self.desc) as progress:
            self._steer(ray, remote, inputs, plan, running, progress, on_done)
        return plan.ordered()

    def _steer(self, ray: Any, remote: Any, inputs: _Inputs, plan: Plan, running: dict[Any, str],
               progress: _Progress, on_done: OnDone | None) -> None:  # fmt: skip
        """Submit every ready piece, take each result as it comes, until all are done."""
        try:
            while not plan.finished:
                for piece in plan.pop_ready():
                    opts = {"num_cpus": piece.num_cpus, "num_gpus": piece.num_gpus, "name": piece.key}
                    task = remote.options(**opts, max_retries=self.max_retries, retry_exceptions=False)
                    ref = task.remote(piece.fn, piece.args, dict(piece.kwargs), *inputs.take(piece))
                    running[ref] = piece.key
                progress.show()
                [ref], _ = ray.wait(list(running), num_returns=1)
                key = running.pop(ref)
                result = _fetch(ray, ref, key)
                inputs.keep(key, ref)
                plan.finish(key, result)
                if on_done is not None:
                    on_done(key, result)
                progress.show()
        except BaseException:
            for ref in running:  # a failed run stops its other pieces rather than leave them on the cluster
                ray.cancel(ref, force=True)
            raise


class _Inputs:
    """The ObjectRefs of results that pieces still to be submitted take, dropped once the last one has it."""

    def __init__(self, ray: Any, plan: Plan) -> None:
        self.ray, self.plan = ray, plan
        self.refs: dict[str, Any] = {}
        self.uses: dict[str, int] = {}
        for p in plan.pieces:
            if p.key not in plan.results:
                for d in p.deps:
                    self.uses[d] = self.uses.get(d, 0) + 1

    def keep(self, key: str, ref: Any) -> None:
        if self.uses.get(key):
            self.refs[key] = ref

    def take(self, piece: Piece) -> list[Any]:
        out = []
        for d in piece.deps:
            if d not in self.refs:  # a result found by done(): put once, shared by every piece taking it
                self.refs[d] = self.ray.put(self.plan.results[d])
            out.append(self.refs[d])
            self.uses[d] -= 1
            if not self.uses[d]:
                del self.refs[d]
        return out


def _fetch(ray: Any, ref: Any, key: str) -> Any:
    """The piece's result; its own exception when it raised; PieceLostError when Ray lost it for good."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            if hasattr(cause, "add_note"):  # a traceback (not the CLI's one line) shows where it was raised
                remote = getattr(exc, "traceback_str", None) or str(exc)
                cause.add_note(f"raised by piece {key} on the Ray cluster:\n{remote}")
            raise cause from None  # the piece's own error, as the local executor raises it
        raise PieceLostError(f"piece {key} failed on the Ray cluster: {_first_line(cause or exc)}") from None
    except ray.exceptions.RayError as exc:  # worker or node died more often than max_retries, OOM kill...
        raise PieceLostError(f"piece {key} was lost on the Ray cluster: {_first_line(exc)}") from None


def _check_resources(ray: Any, plan: Plan) -> None:
    """A piece no node can ever hold would wait forever: say so before submitting anything."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for p in plan.pieces:
        if p.key in plan.results:
            continue
        if not any(r.get("CPU", 0) >= p.num_cpus and r.get("GPU", 0) >= p.num_gpus for r in nodes):
            most = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
            raise SefusionError(
                f"piece {p.key} needs {p.num_cpus:g} CPU(s) and {p.num_gpus:g} GPU(s) on one node; "
                f"the largest node of the Ray cluster has {most[0]:g} CPU(s) and {most[1]:g} GPU(s)"
            )


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse a HOST:PORT nothing answers on at once (ray.init would retry it for minutes, loudly)."""
    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return  # "auto", ray://..., a name Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SefusionError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SefusionError("running on Ray needs the ray package: pip install 'sefusion[ray]'") from None
    return ray


def _first_line(exc: BaseException | str) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return lines[0].strip() if lines else type(exc).__name__

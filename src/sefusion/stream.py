"""One method over one tensor, chunk by chunk: the engine's inner loop.

A tensor is read in chunks of its flat row-major range (a few hundred thousand entries: the chunk of
every model and the method's temporaries stay in cache), and each chunk goes through the method
function as if it were the whole tensor. A method that needs a quantity of the whole tensor asks
`ctx.whole_tensor(stat, x)` (TIES' k-th largest |tau_t|, Scaling-Masks' range); the first time, the
stream runs statistic passes over every chunk before the merge pass:

    pass 1..p   call the method on each chunk; at the first statistic it has not got yet, feed that
                chunk to it and stop the call (CollectingStatistic); after the pass the statistic has
                seen the whole tensor once (radix selection needs two passes, a maximum one)
    last pass   every statistic is known: the method runs to the end on each chunk, results are emitted

Statistics are told apart by the order in which the method asks for them, which is the same on every
chunk. Memory is (models + temporaries) x chunk, whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .methods._ops import TensorContext, WholeTensorStat

if TYPE_CHECKING:
    from torch import Tensor


class CollectingStatistic(Exception):  # noqa: N818 - a control signal, not an error
    """Raised out of a method call whose chunk went to a whole-tensor statistic (a statistic pass)."""


class Cancelled(Exception):  # noqa: N818
    """Another worker failed or the user interrupted: stop between chunks."""


class _Passes:
    """The statistics of one tensor, in the order the method asks for them, and the current pass."""

    def __init__(self) -> None:
        self.stats: list[WholeTensorStat] = []
        self.cursor = 0  # statistics asked for so far in the current method call
        self.fed: int | None = None  # the statistic this pass feeds
        self.results: dict[int, Any] = {}  # this pass's results (tie budgets are consumed chunk by chunk)
        self.generators: dict[int, Any] = {}
        self.chunk: tuple[int, int] | None = None  # (index, count) of the chunk being called

    def wants(self, index: int, count: int) -> bool:
        """Whether the statistic this pass feeds needs chunk `index` of `count` (a sample pass skips some)."""
        if self.fed is None:
            return True
        wants = getattr(self.stats[self.fed], "wants", None)
        return wants is None or wants(index, count)

    def visit(self, stat: WholeTensorStat, x: Tensor) -> Any:
        i = self.cursor
        self.cursor += 1
        if i == len(self.stats):
            self.stats.append(stat)  # first sight; later calls' fresh objects are ignored
        known = self.stats[i]
        if known.done:
            if i not in self.results:
                self.results[i] = known.result()
            return self.results[i]
        if self.fed not in (None, i):
            raise RuntimeError(
                "a method asked for whole-tensor statistics in a different order on another chunk"
            )
        self.fed = i
        if self.chunk is not None and hasattr(known, "wants"):
            known.wants(*self.chunk)  # chunk 0 of a pass: tells it the chunk count
        known.update(x)
        raise CollectingStatistic

    def end_pass(self) -> bool:
        """Close a pass; True when it was the merge pass (no statistic was fed)."""
        self.results = {}
        self.generators = {}
        if self.fed is None:
            return True
        self.stats[self.fed].end_pass()
        self.fed = None
        return False


@dataclass(frozen=True)
class StreamContext(TensorContext):
    """The TensorContext of a tensor merged in chunks: statistics are collected in passes of their own,
    DARE's generators run on from one chunk to the next."""

    passes: _Passes = field(default_factory=_Passes, compare=False, repr=False)

    def whole_tensor(self, stat: WholeTensorStat, x: Tensor) -> Any:
        return self.passes.visit(stat, x)

    def dare_generator(self, expert_index: int) -> Any:
        gens = self.passes.generators
        if expert_index not in gens:
            gens[expert_index] = super().dare_generator(expert_index)
        return gens[expert_index]


def spans(n: int, chunk: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in chunks of about `chunk` entries, each start a multiple of
    `align` (CABS blocks, packed mask bytes). An empty tensor is one empty range."""
    size = max(align, chunk // align * align)
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]


def stream_tensor(
    call: Callable[[Any, Sequence[Any], TensorContext], Any],
    ctx: StreamContext,
    ranges: Sequence[tuple[int, int]],
    read: Callable[[int, int], tuple[Any, Sequence[Any]]],
    emit: Callable[[int, int, Any], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Run `call(base, experts, ctx)` over `ranges`: statistic passes first, then the merge pass, whose
    results go to `emit(start, stop, result)` in order."""
    while True:
        merge_pass: bool | None = None
        for i, (start, stop) in enumerate(ranges):
            if cancelled():
                raise Cancelled
            if merge_pass is False and not ctx.passes.wants(i, len(ranges)):
                continue
            base, experts = read(start, stop)
            ctx.passes.cursor = 0
            ctx.passes.chunk = (i, len(ranges))
            try:
                result = call(base, experts, ctx)
            except CollectingStatistic:
                if merge_pass:
                    raise RuntimeError(
                        "a method asked for a new whole-tensor statistic in its merge pass"
                    ) from None
                merge_pass = False
                continue
            if merge_pass is False:
                raise RuntimeError("a method finished a chunk during a statistic pass")
            merge_pass = True
            emit(start, stop, result)
        if ctx.passes.end_pass():
            return

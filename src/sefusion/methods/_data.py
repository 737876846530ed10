"""What the data-aware methods receive from the engine: per-expert statistics of the tensor being merged.

Kept apart from `sefusion.stats` (stores, accumulators) so that the method files import nothing heavy and
`sefusion.stats` can import the methods package without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SefusionError
from ..registry import STATISTICS_KINDS
from ._ops import TensorContext

if TYPE_CHECKING:
    from torch import Tensor

KINDS = STATISTICS_KINDS
FISHER, GRAM = KINDS


class StatisticsError(SefusionError, ValueError):
    """Statistics are missing, do not match the model, or were computed on too few examples."""


# --------------------------------------------------------------------------- what a method receives


@dataclass(frozen=True)
class TensorStats:
    """One expert's statistics for the tensor being merged.

    fisher: float32, the tensor's shape (None: not asked for or not held). fisher_norm: the expert's
    model-wide Fisher L2 norm over the merged tensors. gram: float64 (in, in) for a linear weight
    (out, in); None where the store holds no Gram for this tensor.
    """

    label: str
    examples: int
    fisher: Tensor | None = None
    fisher_norm: float | None = None
    gram: Tensor | None = None


@dataclass(frozen=True)
class StatsContext(TensorContext):
    """A TensorContext that also carries each expert's statistics for this tensor (None: none given)."""

    stats: tuple[TensorStats | None, ...] | None = field(default=None, compare=False)


def required_statistics(fn: Callable[..., Any]) -> frozenset[str]:
    """The statistics kinds a registered method function reads (empty for data-free methods)."""
    spec = getattr(fn, "spec", None)
    return spec.statistics if spec is not None else frozenset()


def expert_stats(ctx: TensorContext, count: int, method: str, kind: str) -> tuple[TensorStats, ...]:
    """The per-expert statistics in `ctx`, checked: one per expert, none missing.

    Raises StatisticsError naming the method, the tensor and the expert whose statistics are missing.
    """
    stats = getattr(ctx, "stats", None)
    where = f"tensor '{ctx.name}'" if ctx.name else "this tensor"
    if stats is None:
        raise StatisticsError(
            f"method '{method}' needs the {kind} statistics of every expert ({where}); run the statistics "
            "pass (a recipe model entry's `data:` and `examples:`) or pass them (sefusion.stats)"
        )
    if len(stats) != count:
        raise StatisticsError(f"method '{method}': statistics for {len(stats)} experts, but {count} experts")
    names = ctx.task_names if len(ctx.task_names) == count else tuple(str(i) for i in range(count))
    for i, s in enumerate(stats):
        if s is None:
            raise StatisticsError(
                f"method '{method}': missing statistics for expert '{names[i]}' ({where}); "
                "run the statistics pass on its data"
            )
    return tuple(stats)  # type: ignore[arg-type]


def examples_per_expert(examples: int | Sequence[int], count: int) -> list[int]:
    """`examples` (a per-expert parameter) as one count per expert."""
    if isinstance(examples, (list, tuple)):
        if len(examples) != count:
            raise StatisticsError(f"examples: {len(examples)} values for {count} experts")
        return [int(e) for e in examples]
    return [int(examples)] * count


def check_examples(found: int, wanted: int, what: str) -> None:
    """`found` examples must be exactly the `wanted` ones (`examples:`); fewer is "too few examples"."""
    if found < wanted:
        raise StatisticsError(
            f"too few examples for {what}: {found} available, {wanted} asked (`examples:`); "
            "give more data or lower `examples`"
        )
    if found != wanted:
        raise StatisticsError(
            f"statistics of {what} come from {found} examples but {wanted} were asked (`examples:`); "
            "recompute them or set `examples` to match"
        )

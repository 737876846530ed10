"""What a method function receives besides tensors: its parameter types, the tensor's context (name,
seed, task names, whole-tensor quantities, model-wide thresholds) and the bundle tensor it returns."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from annotated_types import Ge, Gt, Le

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


# Parameter types. registry.register evaluates the methods' (string) annotations in the method
# module's globals, so every alias is a module-level name that the method files import. The
# constraints are annotated-types markers, which pydantic enforces like Field(gt=...) and which print
# readably in `sefusion methods` ("float Gt(gt=0) Le(le=1)").
Density = Annotated[float, Gt(0), Le(1)]
Share = Annotated[float, Gt(0), Le(1)]  # q, rho
TaskLambda = Annotated[float, Ge(0)]
Lambdas = TaskLambda | list[TaskLambda] | dict[str, TaskLambda]
NonNegInt = Annotated[int, Ge(0)]
PosInt = Annotated[int, Ge(1)]
ScaleCap = Annotated[float, Ge(1)]
Merge = Literal["mean", "sum"]
BaseMerge = Literal["task_arithmetic", "ties"]
DensityScope = Literal["tensor", "model"]
Stat = Literal["absmax", "quantile"]

DEFAULT_LAMBDA = 0.4  # TALL-Masks / Consensus / Scaling-Masks lambda_t for a task a map leaves out
MTL_TIES_DENSITY = 0.2  # base_merge: ties


@dataclass
class ModelThreshold:
    """Model-wide top-k threshold of one expert (TIES `density_scope: model`).

    Keep every |x| > `value`; of the entries with |x| == `value` (non-zero), keep the first
    `equal_left` in (tensor name, flat index) order. The engine gives each tensor its own share of the
    budget (`tensor_thresholds`); `take_equal` consumes it across that tensor's chunks.
    """

    value: float
    equal_left: int
    # every entry equal to `value` in the scope is kept (the budget is their count): trimming keeps
    # |x| >= value without counting ties chunk by chunk
    equal_all: bool = field(default=False, compare=False)

    def copy(self) -> ModelThreshold:
        return ModelThreshold(self.value, self.equal_left, self.equal_all)

    def take_equal(self, available: int) -> int:
        """Take up to `available` of the remaining ties (this tensor's count); returns how many."""
        take = min(available, self.equal_left)
        self.equal_left -= take
        return take


class WholeTensorStat(Protocol):
    """A quantity of the whole tensor that a method needs before it can merge any part of it (the exact
    k-th largest |tau_t| of TIES, Scaling-Masks' range): fed every part of the tensor in one or more
    passes, then read."""

    done: bool  # every pass has been fed

    def update(self, x: Tensor) -> None: ...  # one part of the data, (rows, n) or a list of rows

    def end_pass(self) -> None: ...

    def result(self) -> Any: ...  # a fresh result each call (tie budgets are consumed as they are used)


@dataclass(frozen=True)
class TensorContext:
    """What the engine knows about the tensor being merged; not a recipe parameter.

    A method sees the tensor's entries as flat (n,) parts: the whole tensor when it is called directly,
    chunks of its flat row-major range when the engine streams it. Quantities of the whole tensor come
    from `whole_tensor`; DARE's random stream from `dare_generator`. Both give the same bits either way.
    """

    name: str = ""
    seed: int = 0
    task_names: tuple[str, ...] = ()
    model_thresholds: list[ModelThreshold] | None = field(default=None, compare=False)

    def whole_tensor(self, stat: WholeTensorStat, x: Tensor) -> Any:
        """`stat` of the whole tensor, of which `x` is the part in hand: here all of it, so every pass is
        fed at once. The streaming engine's context feeds it chunk by chunk, in passes before the merge."""
        while not stat.done:
            stat.update(x)
            stat.end_pass()
        return stat.result()

    def dare_generator(self, expert_index: int) -> Any:
        """The CPU generator of DARE's keep-draws for expert `expert_index` (see `dare_seed`); the
        streaming engine hands out one per expert and tensor that runs on across the tensor's chunks."""
        return torch.Generator().manual_seed(dare_seed(self.seed, self.name, expert_index))


DEFAULT_CTX = TensorContext()


@dataclass(frozen=True)
class BundleTensor:
    """One tensor of a bundle: the merged vector (tau_MTL or tau'), per-task masks, per-task scales.

    Task t's tensor is theta0 + (masks[t] * vector) / scales[t]  (scales None means all 1).
    vector: float32, the tensor's shape. masks: bool, (T, *shape). scales: float32 (T,) or None.
    """

    vector: Tensor
    masks: Tensor
    scales: Tensor | None = None


def dare_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit seed from (recipe seed, tensor name, expert index): independent of order, threads, device."""
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{expert_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_expert(value: float | Sequence[float], count: int, what: str) -> list[float]:
    """A per-expert parameter as one value per expert (a scalar is broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: {len(value)} values for {count} experts")
        return [float(v) for v in value]
    return [float(value)] * count


def check_density(density: float, what: str = "density") -> None:
    if not 0 < density <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {density}")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")

"""What the study calls and what it writes: the injected models / tasks APIs as Protocols, rows as
TypedDicts. `sefusion.models` and `sefusion.tasks.base` satisfy the Protocols; the tests pass fakes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict


class ModelsAPI(Protocol):
    """Training, scoring and statistics of one model family (sefusion.models)."""

    def default_base(self) -> Path: ...
    def default_cache(self) -> Path: ...
    def get_budget(self, name: str) -> Any: ...
    def finetune(
        self, base: Path, tasks: Sequence[Any], specs: Sequence[Any], cfg: Any, cache: Path, *, quiet: bool
    ) -> Path: ...
    def head_only(self, base: Path, task: Any, spec: Any, cfg: Any, cache: Path, *, quiet: bool) -> Path: ...
    def evaluate(
        self,
        body: Mapping[str, Any],
        heads: Mapping[str, Any],
        data: Any,
        split: str,
        spec: Any,
        *,
        base: Path,
        max_length: int,
        precision: str,
    ) -> Mapping[str, Any]: ...
    def expert_statistics(self, expert: Path, **kwargs: Any) -> Any: ...


class TasksAPI(Protocol):
    """Building the study's tasks (sefusion.tasks.base)."""

    def get_task(self, name: str) -> tuple[Any, ...]: ...
    def build_task(
        self,
        name: str,
        *,
        sizes: Any,
        seed: int,
        cache: Path,
        dirs: Mapping[str, Path],
        options: Mapping[str, Any] | None = None,
    ) -> Any: ...


class Row(TypedDict, total=False):
    """One row of results.json: a baseline or a method's selected candidate."""

    method: str
    params: dict[str, Any]
    selected_on: str
    validation: dict[str, float] | None
    test: dict[str, float]
    normalized: dict[str, float]
    avg_normalized: float
    per_kind: dict[str, Any]
    storage_bytes: int
    grid: list[dict[str, Any]]  # every candidate with its validation scores (method rows)
    # per task: interval of the test score, normalized score and gain kept with intervals, flags
    readings: dict[str, dict[str, Any]]


# A point of a size/score curve beside a row: the curve's parameter (e.g. "budget") and its value,
# params, validation, test, normalized, avg_normalized, storage_bytes, size_vs_budget_1.
CurvePoint = dict[str, Any]
# (bodies per task, heads per task, mask statistics) of one candidate
Candidate = tuple[dict[str, dict[str, Any]], Mapping[str, Mapping[str, Any]], dict[str, Any]]
# evaluate(row, params, task, split, body, head, precision=None) -> {"score", "per_kind", "n", "per_example"}
# ("per_example": the encoded per-example scores, `scores.encode_scores`, or None)
Evaluate = Callable[..., dict[str, Any]]

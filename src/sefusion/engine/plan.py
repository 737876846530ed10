"""Planning a merge before any tensor data is read: inputs opened, every tensor name's fate decided
(merged, copied from the base, kept per task), the output folder and the target dtypes checked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import CheckpointError, RecipeError, SefusionError
from ..recipe import Recipe

if TYPE_CHECKING:
    from ..io import ModelReader
    from ..registry import MethodSpec


@dataclass
class Plan:
    """What the engine will do with every tensor name, decided before any tensor data is read."""

    merged: list[str]  # merged by the method, in order
    from_base: list[str]  # excluded or non-float: copied from the base
    per_task: list[str]  # excluded tensors that bundles keep per task (present in every expert)


def is_float(dtype: Any) -> bool:
    return bool(dtype.is_floating_point)


def target_dtype(recipe: Recipe, stored: Any) -> Any:
    """The output dtype of a tensor stored as `stored`: the recipe's `dtype` for floating tensors."""
    if recipe.dtype is None or not is_float(stored):
        return stored
    return getattr(torch, recipe.dtype)


def _describe(reader: ModelReader, name: str) -> str:
    return str(reader.file_of(name))


def open_inputs(recipe: Recipe, spec: MethodSpec) -> tuple[ModelReader | None, list[ModelReader]]:
    """Open the base (if any) and every expert, failing early with a message naming the folder."""
    from ..io import open_model

    base = open_model(recipe.base) if recipe.base else None
    if spec.needs_base and base is None:
        raise RecipeError(f"method '{spec.name}' needs a base model: set `base:` in the recipe")
    experts = [open_model(m.path, base=base) for m in recipe.models]
    return base, experts


def make_plan(
    recipe: Recipe, base: ModelReader | None, experts: Sequence[ModelReader], task_names: Sequence[str],
    *, copy_untouched: bool = False,
) -> Plan:  # fmt: skip
    """Decide per tensor name: merged, copied from the base, or kept per task. Mismatches are errors.
    `copy_untouched`: a tensor every expert reads unchanged from the base (LoRA adapters that leave it
    alone) is copied from it, for a method whose merge of T equal tensors is that tensor."""
    ref = base if base is not None else experts[0]
    ref_label = "the base" if base is not None else f"expert '{task_names[0]}'"
    ref_names = ref.names()
    ref_set = set(ref_names)
    merged: list[str] = []
    from_base: list[str] = []
    for name in ref_names:
        untouched = copy_untouched and _left_alone(base, experts, name)
        if recipe.is_excluded(name) or not is_float(ref.dtype(name)) or untouched:
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


def _left_alone(base: ModelReader | None, experts: Sequence[ModelReader], name: str) -> bool:
    """Every expert is a LoRA adapter of `base` that leaves `name` as it is: each expert's tensor is the
    base's, so Fisher's and RegMean's merges of them are the base's too; copied, it is exactly so (a
    weighted average of T equal values may round), and needs no statistics."""
    return base is not None and all(ex.leaves_alone(name) for ex in experts)


def check_output(out: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """OUT must be apart from every input and not exist unless `overwrite` (checked before any work, and
    again by the writer)."""
    from ..io.publish import check_output as check

    check(out, overwrite, inputs)


def refuse_whole_model(spec: MethodSpec) -> None:
    """A whole-model method cannot run tensor by tensor: say where it runs."""
    if spec.kind == "whole_model":
        where = f"{spec.whole_model.__module__}.{spec.whole_model.__qualname__}"  # type: ignore[union-attr]
        raise RecipeError(
            f"method '{spec.name}' is a whole-model method (it ties tensors together), which the "
            f"tensor-by-tensor merge cannot run: {spec.name} runs in the study (`sefusion study`) and from "
            f"Python ({where})"
        )


def check_device(device: str) -> Any:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SefusionError(f"unknown device '{device}'; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SefusionError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)

"""Checks of a merge's inputs that need more than one reader: dtypes across models, the config to copy."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .reader import ModelReader

if TYPE_CHECKING:
    from ..recipe import Recipe

log = logging.getLogger("sefusion")


def check_inputs(
    recipe: Recipe,
    ref: ModelReader,
    experts: Sequence[ModelReader],
    merged: Sequence[str],
    *,
    configs_of_experts: bool,
) -> None:
    """Dtypes that cannot merge, and the config.json each output will carry (the reference model's, or
    each expert's in a bundle)."""
    check_expert_dtypes(ref, experts, recipe.task_names, merged, recipe.is_excluded)
    for reader in experts if configs_of_experts else [ref]:
        check_config(reader)


def check_expert_dtypes(
    ref: ModelReader,
    experts: Sequence[ModelReader],
    task_names: Sequence[str],
    merged: Sequence[str],
    excluded: Callable[[str], bool],
) -> None:
    """A tensor merged as floating point must be floating point in every expert (an integer copy would be
    converted and merged silently); an excluded one that is not is copied from the base, with a warning."""
    for task, ex in zip(task_names, experts, strict=True):
        if ex is ref:
            continue
        for name in merged:
            if name in ex and not ex.dtype(name).is_floating_point:
                raise CheckpointError(
                    f"tensor '{name}' is {_dt(ex, name)} in expert '{task}' ({ex.file_of(name)}) but "
                    f"{_dt(ref, name)} in {ref.path}: integer tensors cannot be merged; `exclude` it to "
                    "copy the base's"
                )
        for name in ref.names():
            if excluded(name) and name in ex and ex.dtype(name) != ref.dtype(name):
                log.warning(
                    "tensor '%s' is %s in expert '%s' but %s in %s; it is excluded, so the base's is copied",
                    name, _dt(ex, name), task, _dt(ref, name), ref.path,
                )  # fmt: skip


def _dt(reader: ModelReader, name: str) -> str:
    return str(reader.dtype(name)).removeprefix("torch.")


def check_config(reader: ModelReader) -> None:
    """The config.json copied into the output must be a JSON object; a model without one gets a warning
    that the output will lack it (transformers cannot load such a folder)."""
    config = next((f for f in reader.aux_files() if f.name == "config.json"), None)
    if config is None:
        log.warning(
            "warning: %s has no config.json, so the output will have none: transformers cannot load it "
            "until you copy the right config.json into it",
            reader.path,
        )
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({exc}); the output would copy it as is") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} is not a JSON object; the output would copy it as is")

"""The streaming engine: one tensor name at a time across base + experts.

checkpoints -> plan (names, shapes, what is merged, what is excluded) -> per tensor: read (prefetched on
a thread), cast to float32 on the device, run the method, cast to the output dtype, write.
Memory is bounded by (1 + T) tensors in flight (two names: the one computed and the one prefetched)
plus one output shard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from ._lazy import torch
from .errors import CheckpointError, RecipeError, SefusionError
from .recipe import Recipe, load_recipe
from .registry import METHODS, MethodSpec

if TYPE_CHECKING:
    from torch import Tensor

    from .io import ModelReader

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


def _resolve_task_params(kwargs: dict[str, Any], spec: MethodSpec, task_names: Sequence[str]) -> None:
    """Check per-task parameters against the task names before any tensor is read: `lambdas` maps become
    one value per expert; a CABS `order` must name every task once."""
    from .methods import _ops

    try:
        if "lambdas" in spec.params:
            arg = spec.params["lambdas"].arg
            kwargs[arg] = _ops.resolve_per_task(
                kwargs[arg], list(task_names), "lambdas", default=_ops.DEFAULT_LAMBDA
            )
        if "order" in spec.params:
            _ops.resolve_order(kwargs[spec.params["order"].arg], list(task_names))
    except ValueError as exc:
        raise RecipeError(f"method '{spec.name}': {exc}") from None


class TensorSource:
    """Reads one name across base + experts, checks values, and prefetches the next name on a thread."""

    def __init__(
        self,
        base: ModelReader | None,
        experts: Sequence[ModelReader],
        task_names: Sequence[str],
        *,
        allow_nonfinite: bool,
    ) -> None:
        self.base = base
        self.experts = list(experts)
        self.task_names = list(task_names)
        self.allow_nonfinite = allow_nonfinite

    def read(self, name: str, *, with_base: bool = True) -> tuple[Tensor | None, list[Tensor]]:
        from .io import check_finite

        base = self.base.get(name) if (with_base and self.base is not None) else None
        experts = [ex.get(name) for ex in self.experts]
        if not self.allow_nonfinite:
            if base is not None:
                check_finite(name, base, self.base.file_of(name))  # type: ignore[union-attr]
            for ex, t in zip(self.experts, experts, strict=True):
                check_finite(name, t, ex.file_of(name))
        return base, experts

    def stream(
        self, names: Sequence[str], *, with_base: bool = True
    ) -> Iterator[tuple[str, Tensor | None, list[Tensor]]]:
        """Yield (name, base, experts) in order while the next name is read on a second thread."""
        if not names:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sefusion-read") as pool:
            pending: Future = pool.submit(self.read, names[0], with_base=with_base)
            for i, name in enumerate(names):
                base, experts = pending.result()
                if i + 1 < len(names):
                    pending = pool.submit(self.read, names[i + 1], with_base=with_base)
                yield name, base, experts


def _target_dtype(recipe: Recipe, stored: Any) -> Any:
    if recipe.dtype is None or not _is_float(stored):
        return stored
    return getattr(torch, recipe.dtype)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=quiet or None, leave=False)


def _model_thresholds(
    spec: MethodSpec, kwargs: dict[str, Any], source: TensorSource, plan: Plan, quiet: bool
) -> Any:
    """TIES with `density_scope: model`: one bounded-memory pass for the exact model-wide thresholds."""
    if kwargs.get("density_scope") != "model":
        return None
    from .methods import _ops

    def task_vectors() -> Iterator[list[Tensor]]:
        bar = _progress(len(plan.merged), "model-wide top-k", quiet)
        for _name, base, experts in source.stream(plan.merged):
            b = base.float() if base is not None else None
            yield [e.float() - b if b is not None else e.float() for e in experts]
            bar.update()
        bar.close()

    return _ops.model_thresholds(task_vectors, len(source.experts), kwargs["density"])


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
) -> MergeReport:
    """Merge the recipe's experts into OUT: a model folder, or a bundle folder for bundle methods.

    Reads one tensor at a time; nothing is written to OUT unless the whole merge succeeds.
    """
    import time

    from .io import parse_size

    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe if isinstance(recipe, (str, Path)) else dict(recipe))
    out = Path(out)
    spec = METHODS.get(recipe.method)
    task_names = recipe.task_names
    kwargs = spec.resolve(recipe.params, [m.params for m in recipe.models])
    _resolve_task_params(kwargs, spec, task_names)
    weights = [m.weight for m in recipe.models]
    size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    dev = _check_device(device)
    if out.exists() and not overwrite:
        raise SefusionError(f"output folder {out} exists; pass --overwrite to replace it")

    base, experts = open_inputs(recipe, spec)
    try:
        plan = make_plan(recipe, base, experts, task_names)
        source = TensorSource(base, experts, task_names, allow_nonfinite=allow_nonfinite)
        if spec.kind == "bundle":
            from .bundle import write_bundle

            write_bundle(
                out, recipe, spec, kwargs, weights, base, experts, plan, source,
                overwrite=overwrite, shard_size=size, device=dev, quiet=quiet,
            )  # fmt: skip
        else:
            _write_merge(
                out, recipe, spec, kwargs, weights, base, experts, plan, source, size, dev, overwrite, quiet
            )
    finally:
        for r in [base, *experts]:
            if r is not None:
                r.close()
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


def compute_tensor(
    spec: MethodSpec,
    kwargs: Mapping[str, Any],
    weights: Sequence[float],
    name: str,
    base: Tensor | None,
    experts: Sequence[Tensor],
    *,
    seed: int,
    task_names: Sequence[str],
    device: Any,
    thresholds: Any = None,
) -> Any:
    """Run the method on one tensor name: float32 on `device`; returns the method's raw result."""
    from .methods import TensorContext

    ctx = TensorContext(name=name, seed=seed, task_names=tuple(task_names), model_thresholds=thresholds)
    # The base in float32; experts stay in their stored dtype (methods compute in float32 as they read
    # them): T float32 copies of every tensor would double the memory and the passes over it.
    b = base.to(device=device, dtype=torch.float32) if base is not None else None
    xs = [e.to(device=device) for e in experts]
    return spec.fn(b, xs, list(weights), **kwargs, ctx=ctx)


def _write_merge(
    out: Path,
    recipe: Recipe,
    spec: MethodSpec,
    kwargs: dict[str, Any],
    weights: list[float],
    base: ModelReader | None,
    experts: list[ModelReader],
    plan: Plan,
    source: TensorSource,
    shard_size: int,
    device: Any,
    overwrite: bool,
    quiet: bool,
) -> None:
    from .io import ModelWriter

    thresholds = _model_thresholds(spec, kwargs, source, plan, quiet)
    ref = base if base is not None else experts[0]
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
        for name, b, xs in source.stream(plan.merged, with_base=spec.needs_base):
            result = compute_tensor(
                spec, kwargs, weights, name, b, xs,
                seed=recipe.seed, task_names=recipe.task_names, device=device, thresholds=thresholds,
            )  # fmt: skip
            stored = ref.dtype(name)
            w.add(name, result.to(dtype=_target_dtype(recipe, stored)).cpu())
            bar.update()
        for name in plan.from_base:
            t = ref.get(name)
            w.add(name, t.to(_target_dtype(recipe, t.dtype)))
            bar.update()
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
    **params: Any,
) -> dict[str, Any]:
    """Merge in-memory tensor dicts with `method` (same maths as `merge`, no files).

    Returns {name: tensor} for merge methods and {name: BundleTensor} for bundle methods. Every
    tensor name of the first expert is merged; all dicts must hold the same names and shapes.
    """
    spec = METHODS.get(method)
    if not experts:
        raise RecipeError("merge_tensors needs at least one expert")
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise RecipeError(f"{len(names)} task names for {len(experts)} experts")
    kwargs = spec.resolve(params, list(per_expert) if per_expert else None, where="merge_tensors")
    _resolve_task_params(kwargs, spec, names)
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
    if kwargs.get("density_scope") == "model":
        from .methods import _ops

        def task_vectors() -> Iterator[list[Tensor]]:
            for k in keys:
                b = base[k].float() if base is not None else None
                yield [ex[k].float() - b if b is not None else ex[k].float() for ex in experts]

        thresholds = _ops.model_thresholds(task_vectors, len(experts), kwargs["density"])
    result: dict[str, Any] = {}
    for k in keys:
        r = compute_tensor(
            spec, kwargs, w, k, base[k] if base is not None else None, [ex[k] for ex in experts],
            seed=seed, task_names=names, device="cpu", thresholds=thresholds,
        )  # fmt: skip
        result[k] = r if spec.kind == "bundle" else r.to(experts[0][k].dtype)
    return result

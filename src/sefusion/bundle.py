"""TALL-Masks / Scaling-Masks bundles: one artefact that serves every task.

A bundle folder holds
  bundle.json                  method, params, tasks, the base (path + sha256), tensor shapes and dtypes
  model*.safetensors (+index)  tensors under prefixed keys:
                                 vector/<name>        float32, the merged vector (tau_MTL or tau')
                                 masks/<name>         uint8 (T, ceil(n/8)), task masks packed 8 per byte
                                                      (flat row-major order, little-endian bits)
                                 scales/<name>        float32 (T,), Scaling-Masks' s_t (absent for TALL)
                                 tasks/<task>/<name>  each task's own copy of excluded tensors (heads)
  tasks/<task>/                config and tokenizer files of that task's expert
Task t's tensor is theta0 + (m_t * vector) / s_t, computed in float32 and cast once to the tensor's dtype.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._lazy import torch
from ._version import __version__
from .bundle_format import (
    FORMAT,
    FORMAT_VERSION,
    bytes_sha256,
    check_base,
    check_store,
    corrupt,
    folder_checksums,
    parse_manifest,
    range_sha256,
)
from .errors import CheckpointError, SefusionError

if TYPE_CHECKING:
    from torch import Tensor

    from .engine.plan import Plan
    from .io import ModelReader
    from .recipe import Recipe
    from .registry import MethodSpec

DtypeOf = Callable[[Any], Any]  # a stored dtype -> the output's (the recipe's `dtype`)

MANIFEST = "bundle.json"


def pack_masks(masks: Tensor) -> Tensor:
    """(T, *shape) bool -> (T, ceil(n/8)) uint8, flat row-major order, bit i of a byte = entry 8j+i."""
    import numpy as np

    flat = masks.reshape(masks.shape[0], -1).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, axis=1, bitorder="little"))


def unpack_mask(packed_row: Tensor, shape: Sequence[int]) -> Tensor:
    """One task's row of packed bits -> bool tensor of `shape`."""
    import numpy as np

    n = math.prod(shape)
    bits = np.unpackbits(packed_row.cpu().numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def rebuild(base: Tensor, vector: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    """theta_t = theta0 + (m_t * vector) / s_t in float32."""
    delta = torch.where(mask, vector.float(), torch.zeros((), dtype=torch.float32, device=vector.device))
    if scale is not None and scale != 1.0:
        delta = delta / scale
    return base.float() + delta


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def card(out: Path, recipe: Recipe, spec: MethodSpec) -> str:
    """The bundle's README."""
    tasks = recipe.task_names
    return (
        f"# sefusion bundle ({spec.name})\n\nServes {len(tasks)} tasks: {', '.join(tasks)}.\n"
        f"Rebuild one with `sefusion extract {out.name} TASK OUT`.\n\n"
        "## Recipe\n\n```yaml\n" + recipe.to_yaml() + "```\n"
    )


def layout(
    plan: Plan, recipe: Recipe, base: ModelReader, experts: Sequence[ModelReader], dtype_of: DtypeOf
) -> list[tuple[str, Sequence[int], Any]]:
    """(key, shape, dtype) of every tensor a bundle stores: vector, packed masks and scales of each merged
    tensor, each task's own copy of the per-task tensors."""
    n_tasks = len(recipe.task_names)
    out: list[tuple[str, Sequence[int], Any]] = []
    for name in plan.merged:
        shape = base.shape(name)
        out += [
            (f"vector/{name}", shape, torch.float32),
            (f"masks/{name}", (n_tasks, (math.prod(shape) + 7) // 8), torch.uint8),
            (f"scales/{name}", (n_tasks,), torch.float32),
        ]
    for task, ex in zip(recipe.task_names, experts, strict=True):
        out += [(f"tasks/{task}/{name}", ex.shape(name), dtype_of(ex.dtype(name))) for name in plan.per_task]
    return out


def finish(
    folder: Path,
    recipe: Recipe,
    spec: MethodSpec,
    kwargs: Mapping[str, Any],
    plan: Plan,
    base: ModelReader,
    experts: Sequence[ModelReader],
    dtype_of: DtypeOf,
) -> None:
    """Each task's config files and bundle.json, into the (temporary) bundle folder."""
    from .io import file_sha256

    tasks = recipe.task_names
    _copy_task_files(folder, tasks, experts)

    def info(names: Sequence[str]) -> dict[str, Any]:
        return {
            n: {"shape": list(base.shape(n)), "dtype": _dtype_name(dtype_of(base.dtype(n)))} for n in names
        }

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sefusion_version": __version__,
        "method": spec.name,
        "params": {p.name: _jsonable(kwargs[p.arg]) for p in spec.params.values()},
        "seed": recipe.seed,
        "base": {"path": str(Path(base.path).resolve()), "sha256": file_sha256(base.weight_files())},
        "tasks": [
            {"name": task, "source": str(m.path), "weight": m.weight}
            for task, m in zip(tasks, recipe.models, strict=True)
        ],
        "tensors": info(plan.merged),
        "from_base": info([n for n in plan.from_base if n not in plan.per_task]),
        "per_task": list(plan.per_task),
        "recipe": recipe.model_dump(mode="json"),
    }
    manifest["checksums"] = folder_checksums(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _copy_task_files(folder: Path, tasks: Sequence[str], experts: Sequence[ModelReader]) -> None:
    """Each task's expert's config and tokenizer files under tasks/<task>/ (what `extract` writes out)."""
    for task, ex in zip(tasks, experts, strict=True):
        task_dir = folder / "tasks" / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for f in ex.aux_files():
            shutil.copy2(f, task_dir / f.name)


class Bundle:
    """A bundle folder opened for reading."""

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        """Open and check a bundle: its manifest in full, against the stored tensors; with `verify`, every
        stored tensor's checksum now (otherwise each is verified when read)."""
        from .io import SafetensorsReader, open_model

        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"{self.path} is not a sefusion bundle (no {MANIFEST})")
        try:
            self.manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{mf} is not valid JSON: {exc}") from None
        self.spec = parse_manifest(self.manifest, mf)
        self.store = open_model(self.path)
        try:
            if not isinstance(self.store, SafetensorsReader):
                raise CheckpointError(f"bundle {self.path} does not store its tensors as safetensors")
            check_store(self.spec, self.store, self.path)
            if verify:
                self.verify()
        except BaseException:
            self.store.close()
            raise

    def verify(self) -> None:
        """Check every stored tensor's bytes against its checksum (read from disk piece by piece)."""
        for key in self.store.names():
            if range_sha256(self.store.info(key)) != self.spec.checksums[key]:  # type: ignore[attr-defined]
                raise corrupt(self.path, key)

    def get(self, key: str) -> Tensor:
        """Stored tensor `key`, its checksum verified."""
        t = self.store.get(key)
        if bytes_sha256(t) != self.spec.checksums[key]:
            raise corrupt(self.path, key)
        return t

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise SefusionError(
                f"bundle {self.path} has no task '{task}'; its tasks: {', '.join(self.tasks)}"
            ) from None

    def open_base(self, base: str | Path | None = None, *, check_hash: bool = True) -> ModelReader:
        from .io import file_sha256, open_model

        path = Path(base) if base is not None else Path(self.manifest["base"]["path"])
        reader = open_model(path)
        if check_hash:
            digest = file_sha256(reader.weight_files())
            if digest != self.manifest["base"]["sha256"]:
                reader.close()
                raise CheckpointError(
                    f"base model at {path} does not match the one bundle {self.path} was built on "
                    f"(sha256 {digest[:12]}... vs {self.manifest['base']['sha256'][:12]}...); "
                    "pass --base with the right folder"
                )
        try:
            check_base(self.spec, reader, self.path)
        except BaseException:
            reader.close()
            raise
        return reader

    def task_tensor(self, base: ModelReader, name: str, t: int) -> Tensor:
        """Task t's float32 tensor `name` rebuilt from the base, the merged vector, its mask and scale."""
        info = self.manifest["tensors"][name]
        mask = unpack_mask(self.get(f"masks/{name}")[t], info["shape"])
        scale = float(self.get(f"scales/{name}")[t])
        return rebuild(base.get(name), self.get(f"vector/{name}"), mask, scale)

    def storage(self) -> dict[str, int]:
        """Bytes of this bundle vs. T separate checkpoints of the same dtype."""
        bundle_bytes = sum(f.stat().st_size for f in self.store.weight_files())
        per_model = 0
        for info in [*self.manifest["tensors"].values(), *self.manifest["from_base"].values()]:
            per_model += math.prod(info["shape"]) * _itemsize(info["dtype"])
        for name in self.manifest["per_task"]:
            key = f"tasks/{self.tasks[0]}/{name}"
            per_model += math.prod(self.store.shape(key)) * self.store.dtype(key).itemsize
        return {"bundle_bytes": bundle_bytes, "separate_bytes": per_model * len(self.tasks)}

    def close(self) -> None:
        self.store.close()


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def extract(
    bundle: str | Path,
    task: str,
    out: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    quiet: bool = True,
    allow_nonfinite: bool = False,
) -> Path:
    """Write task TASK's model from BUNDLE as a normal model folder (config from the task's expert)."""
    from .io import ModelWriter, parse_size
    from .io.publish import check_output
    from .progress import progress

    out = Path(out)
    check_output(out, overwrite, [bundle, base])
    b = Bundle(bundle)
    try:
        t = b.task_index(task)
        check_output(out, overwrite, [b.manifest["base"]["path"] if base is None else base])
        size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
        base_reader = b.open_base(base)
    except BaseException:
        b.close()
        raise
    task_dir = b.path / "tasks" / task
    card = (
        f"# Task '{task}' extracted from a sefusion bundle\n\nMethod: `{b.manifest['method']}`, "
        f"params: `{json.dumps(b.manifest['params'])}`, sefusion {__version__}.\n"
    )
    try:
        names = list(b.manifest["tensors"])
        per_task = list(b.manifest["per_task"])
        layout = sorted(
            [(n, info["shape"], getattr(torch, info["dtype"])) for n, info in b.manifest["tensors"].items()]
            + [
                (n, info["shape"], getattr(torch, info["dtype"]))
                for n, info in b.manifest["from_base"].items()
            ]
            + [(n, b.store.shape(f"tasks/{task}/{n}"), b.store.dtype(f"tasks/{task}/{n}")) for n in per_task]
        )
        with ModelWriter(
            out, overwrite=overwrite, shard_size=size, aux_from=task_dir, model_card=card, layout=layout,
            allow_nonfinite=allow_nonfinite,
        ) as w:  # fmt: skip
            bar = progress(len(names), f"extract {task}", quiet)
            for name in names:
                dtype = getattr(torch, b.manifest["tensors"][name]["dtype"])
                w.add(name, b.task_tensor(base_reader, name, t).to(dtype))
                bar.update()
            bar.close()
            for name in per_task:
                w.add(name, b.get(f"tasks/{task}/{name}"))
            for name, info in b.manifest["from_base"].items():
                w.add(name, base_reader.get(name).to(getattr(torch, info["dtype"])))
            w.commit()
    finally:
        base_reader.close()
        b.close()
    return out

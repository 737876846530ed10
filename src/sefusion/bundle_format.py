"""bundle.json: its schema, its agreement with the tensors the bundle stores, and their checksums.

A bundle's manifest is checked in full when the bundle is opened (required keys, known dtypes, unique
tasks, every stored tensor listed with the shape the manifest implies), and every stored tensor carries
the SHA-256 of its bytes, verified when it is read: a flipped byte in a mask is an error naming the
tensor, never a different model.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import CheckpointError
from .io._header import _DTYPE_NAMES, TensorInfo, read_header

if TYPE_CHECKING:
    from torch import Tensor

    from .io import ModelReader

FORMAT = "sefusion-bundle"
FORMAT_VERSION = 2  # 2: `checksums` of every stored tensor
DTYPE_NAMES = tuple(sorted(set(_DTYPE_NAMES.values())))

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    dtype: Literal[DTYPE_NAMES]  # type: ignore[valid-type]


class BaseRef(_Strict):
    path: Name
    sha256: Sha256


class TaskRef(_Strict):
    name: Name
    source: str
    weight: Annotated[float, Field(allow_inf_nan=False, strict=True)]

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError(f"a task name is a plain word, got {v!r}")
        return v


class Manifest(_Strict):
    format: Literal["sefusion-bundle"]
    format_version: Literal[2]
    sefusion_version: str
    method: Name
    params: dict[str, Any]
    seed: Annotated[StrictInt, Field(ge=0)]
    base: BaseRef
    tasks: Annotated[list[TaskRef], Field(min_length=1)]
    tensors: dict[str, TensorSpec]
    from_base: dict[str, TensorSpec]
    per_task: list[str]
    recipe: dict[str, Any]
    checksums: dict[str, Sha256]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is listed twice")
        if len(set(self.per_task)) != len(self.per_task):
            raise ValueError("per_task lists a tensor twice")
        both = sorted(set(self.tensors) & set(self.from_base))
        if both:
            raise ValueError(f"tensor {both[0]!r} is both merged (tensors) and copied (from_base)")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "bundle.json"


def parse_manifest(data: Any, where: Path) -> Manifest:
    """The manifest, validated; one CheckpointError naming the file and the first bad key otherwise."""
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a sefusion bundle manifest")
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has bundle format version {data.get('format_version')!r}; this sefusion reads version "
            f"{FORMAT_VERSION} (re-create the bundle with `sefusion merge`)"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        what = "missing" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise CheckpointError(
            f"{where} is not a valid bundle manifest: {_loc(e['loc'])}: {what}{more}"
        ) from None


def stored_layout(m: Manifest) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Every tensor the bundle must store: key -> (shape, dtype name; None where the expert decides)."""
    n_tasks = len(m.tasks)
    out: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for name, spec in m.tensors.items():
        out[f"vector/{name}"] = (tuple(spec.shape), "float32")
        out[f"masks/{name}"] = ((n_tasks, (math.prod(spec.shape) + 7) // 8), "uint8")
        out[f"scales/{name}"] = ((n_tasks,), "float32")
    for task in m.task_names:
        for name in m.per_task:
            out[f"tasks/{task}/{name}"] = ((), None)
    return out


def check_store(m: Manifest, store: ModelReader, where: Path) -> None:
    """The stored tensors are exactly those the manifest implies, with its shapes, dtypes and checksums."""
    want = stored_layout(m)
    have = set(store.names())
    for key, (shape, dtype) in want.items():
        if key not in have:
            raise CheckpointError(f"bundle {where} is incomplete: it does not store tensor '{key}'")
        got_dtype = str(store.dtype(key)).removeprefix("torch.")
        if dtype is not None and (tuple(store.shape(key)) != shape or got_dtype != dtype):
            raise CheckpointError(
                f"bundle {where}: bundle.json implies tensor '{key}' is {list(shape)} {dtype}, but the stored "
                f"one is {list(store.shape(key))} {got_dtype}"
            )
    extra = sorted(have - set(want))
    if extra:
        raise CheckpointError(f"bundle {where} stores tensor '{extra[0]}', which bundle.json does not list")
    unsummed = sorted(have - set(m.checksums)) or sorted(set(m.checksums) - have)
    if unsummed:
        raise CheckpointError(
            f"bundle {where}: bundle.json's checksums do not match the stored tensors (at '{unsummed[0]}')"
        )


def check_base(m: Manifest, base: ModelReader, where: Path) -> None:
    """The base holds every merged and copied tensor, with the manifest's shapes."""
    for name, spec in [*m.tensors.items(), *m.from_base.items()]:
        if name not in base:
            raise CheckpointError(
                f"bundle {where} lists tensor '{name}', which the base {base.path} does not hold"
            )
        if list(base.shape(name)) != spec.shape:
            raise CheckpointError(
                f"bundle {where} says tensor '{name}' has shape {spec.shape}, the base {base.path} has "
                f"{list(base.shape(name))}"
            )


def bytes_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (row-major, little-endian)."""
    import torch

    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def range_sha256(info: TensorInfo, chunk: int = 1 << 22) -> str:
    """SHA-256 of a stored tensor's bytes, read from its file in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(info.file, "rb") as fh:
        fh.seek(info.offset)
        left = info.nbytes
        while left > 0:
            block = fh.read(min(chunk, left))
            if not block:
                raise CheckpointError(f"{info.file} ends before its tensors do (truncated)")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """key -> SHA-256 of every tensor in the folder's safetensors files (hidden ones included)."""
    out: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            for key, info in read_header(folder / f).items():
                out[key] = range_sha256(info)
    return dict(sorted(out.items()))


def corrupt(where: Path, key: str) -> CheckpointError:
    return CheckpointError(
        f"bundle {where} is corrupt: stored tensor '{key}' does not match its checksum in bundle.json "
        "(damaged on disk or in transfer); re-create or re-copy the bundle"
    )

"""Lazy per-tensor readers over a model folder: safetensors (single, sharded, or any *.safetensors), .bin.

A reader answers names, shapes and dtypes from headers alone and reads one tensor at a time from a
memory map, so a merge never holds a whole model in memory.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import CheckpointError
from ._header import TensorInfo, read_header

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"

# Files besides the weights that loading a model folder needs (config, tokenizer, chat template).
AUX_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
    }
)
# Remote-code models need their python files next to config.json.
AUX_PREFIXES = ("configuration_", "modeling_", "tokenization_")


def find_aux_files(folder: Path) -> list[Path]:
    """The non-weight files of `folder` a loader needs: config, tokenizer files, *.model, chat templates."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        n = p.name
        if (
            n in AUX_NAMES
            or n.endswith(".model")
            or n.endswith(".tiktoken")
            or (n.endswith(".py") and n.startswith(AUX_PREFIXES))
        ):
            out.append(p)
    return out


class ModelReader(ABC):
    """Read-only, lazy view of one model's tensors. Use as a context manager or call close()."""

    path: Path
    kind: str

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor name, sorted."""

    def leaves_alone(self, name: str) -> bool:
        """Whether tensor `name` is known to be the base's, unchanged (a LoRA adapter's view says so; a
        whole checkpoint cannot)."""
        return False

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abstractmethod
    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name` (for error messages)."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` on the CPU in its stored dtype, freshly read (the caller may modify it)."""

    def open_tensor(self, name: str) -> TensorRange:
        """Ranges of tensor `name`'s flat data, for reading it chunk by chunk (this default reads the whole
        tensor once, on first use, and slices it)."""
        return _WholeTensorRange(self, name)

    @abstractmethod
    def weight_files(self) -> list[Path]: ...

    @abstractmethod
    def __contains__(self, name: object) -> bool: ...

    def aux_files(self) -> list[Path]:
        folder = self.path if self.path.is_dir() else self.path.parent
        return find_aux_files(folder)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"no tensor '{name}' in {self.path}")


class TensorRange(ABC):
    """One tensor of a model, read by ranges of its flat row-major data in its stored dtype."""

    @abstractmethod
    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entries [start, stop) as a flat tensor; `out` (flat, stored dtype, stop - start entries) may be
        filled and returned, or a view of memory the range holds may be returned instead."""


class _WholeTensorRange(TensorRange):
    def __init__(self, reader: ModelReader, name: str) -> None:
        self._reader, self._name = reader, name
        self._flat: torch.Tensor | None = None

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._flat is None:
            self._flat = self._reader.get(self._name).reshape(-1)
        return self._flat[start:stop]


class _FileRange(TensorRange):
    """A safetensors tensor read by positional reads at its data offset: no map, no whole-tensor copy."""

    def __init__(self, reader: SafetensorsReader, name: str, info: TensorInfo) -> None:
        self._reader, self._name, self._info = reader, name, info

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self._info
        if out is None:
            out = torch.empty(stop - start, dtype=info.dtype)
        size = info.dtype.itemsize
        self._reader._pread(self._name, info, out, info.offset + start * size)
        return out


class SafetensorsReader(ModelReader):
    """One or more safetensors files seen as one model; a name held by two files is an error."""

    kind = "safetensors"

    def __init__(self, path: Path, files: list[Path], *, index: dict[str, str] | None = None) -> None:
        self.path = path
        self._files = sorted(files)
        self._info: dict[str, TensorInfo] = {}
        for f in self._files:
            for name, info in read_header(f).items():
                if name in self._info:
                    raise CheckpointError(f"tensor '{name}' is in two files: {self._info[name].file} and {f}")
                self._info[name] = info
        if index is not None:
            self._check_index(index)
        self._names = sorted(self._info)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def _check_index(self, index: dict[str, str]) -> None:
        """The index and its shards agree both ways: every mapped tensor is in its shard, every tensor
        a shard holds is mapped (to that shard)."""
        where = self.path / SAFE_INDEX
        for name, fname in index.items():
            info = self._info.get(name)
            if info is None or info.file != self.path / fname:
                found = f"it is in {info.file}" if info else "no shard holds it"
                raise CheckpointError(f"{where} maps tensor '{name}' to {fname}, but {found}")
        unlisted = sorted(set(self._info) - set(index))
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise CheckpointError(
                f"{where} does not list tensor '{unlisted[0]}'{more}, which shard {self._info[unlisted[0]].file} "
                "holds: the index and its shards disagree"
            )

    def names(self) -> list[str]:
        return list(self._names)

    def _entry(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise self._missing(name) from None

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name`'s bytes lie: file, byte offset and length, shape and dtype."""
        return self._entry(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a positional read into fresh memory.

        Not a memory map: mapped pages stay resident (and count in RSS) for as long as the file is open,
        so a merge that maps every input would hold the whole models; a plain read keeps memory bounded
        by the tensors in flight, and the result is the caller's own (safe to modify in place).
        """
        info = self._entry(name)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread(name, info, out, info.offset)
        return out.view(info.dtype).reshape(info.shape)

    def open_tensor(self, name: str) -> TensorRange:
        return _FileRange(self, name, self._entry(name))

    def _pread(self, name: str, info: TensorInfo, out: torch.Tensor, offset: int) -> None:
        """Fill contiguous `out` with the file's bytes from `offset` on."""
        try:
            with self._lock:
                fd = self._handles.get(info.file)
                if fd is None:
                    fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
            view = memoryview(out.view(torch.uint8).numpy())
            done, nbytes = 0, view.nbytes
            while done < nbytes:  # preadv may return short on large reads
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"unexpected end of file at byte {offset + done}")
                done += got
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {info.file}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()


class BinReader(ModelReader):
    """PyTorch pickles (`pytorch_model.bin`, maybe sharded), loaded weights_only and memory-mapped,
    one file at a time on first use."""

    kind = "bin"

    def __init__(self, path: Path, files: list[Path], *, index: dict[str, str] | None = None) -> None:
        self.path = path
        self._files = sorted(files)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._where: dict[str, Path] = {}
        if index is not None:
            self._where = {name: path / fname for name, fname in index.items()}
        else:
            for f in self._files:
                for name in self._load(f):
                    if name in self._where:
                        raise CheckpointError(f"tensor '{name}' is in two files: {self._where[name]} and {f}")
                    self._where[name] = f
        self._names = sorted(self._where)

    def _load(self, f: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            sd = self._loaded.get(f)
            if sd is not None:
                return sd
            try:
                try:
                    obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    # The legacy (pre-1.6, non-zip) format cannot be memory-mapped; read it plainly.
                    if "mmap" not in str(exc) or not f.is_file():
                        raise
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{f} is not a plain state dict of tensors (weights_only load refused it: "
                    f"{str(exc).splitlines()[0]})"
                ) from None
            except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"cannot read {f} (corrupt or truncated?): {msg}") from None
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
            ):
                raise CheckpointError(f"{f} does not hold a flat state dict {{name: tensor}}")
            self._loaded[f] = obj
            return obj

    def _tensor(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise self._missing(name)
        sd = self._load(f)
        if name not in sd:
            raise CheckpointError(f"index of {self.path} maps tensor '{name}' to {f}, which does not hold it")
        return sd[name]

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def file_of(self, name: str) -> Path:
        f = self._where.get(name)
        if f is None:
            raise self._missing(name)
        return f

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def get(self, name: str) -> torch.Tensor:
        # A copy: mmap'd storages may be shared between tied names, and the caller may modify the result.
        t = self._tensor(name)
        try:
            return t.clone()
        except RuntimeError as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {self.file_of(name)}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' must map tensor names to shard file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index_file} is not a valid index (needs a 'weight_map'): {exc}") from None
    for fname in sorted(set(weight_map.values())):
        _check_shard_name(index_file, fname)
    return weight_map


def _check_shard_name(index_file: Path, fname: str) -> None:
    """A shard is a file inside the model folder: a relative path without `..`, checked on the name alone
    (before anything is opened; symlinks inside the folder, as in a hub cache, stay allowed)."""
    parts = PurePosixPath(fname.replace("\\", "/")).parts
    if not fname or "\0" in fname or fname.startswith(("/", "\\")) or ".." in parts or ":" in fname[:2]:
        raise CheckpointError(
            f"{index_file} names shard {fname!r}, which is outside the model folder; a shard must be a file "
            "inside it"
        )


def _index_files(index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    folder = index_file.parent
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_file} lists {len(shards)} shards but {len(missing)} are missing: {', '.join(missing)}"
        )
    return [folder / s for s in shards]


def open_model(path: str | Path, *, base: ModelReader | None = None) -> ModelReader:
    """Open a model folder (or one .safetensors file) for lazy per-tensor reading.

    Detection, first match wins: `adapter_config.json` (PEFT LoRA adapter, merged onto `base` on
    read), `model.safetensors.index.json`, `model.safetensors`, any `*.safetensors`,
    `pytorch_model.bin.index.json`, `pytorch_model.bin`.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsReader(p, [p])
        if p.suffix == ".bin":
            return BinReader(p, [p])
        raise CheckpointError(f"{p} is neither a model folder nor a .safetensors or .bin file")
    if not p.exists():
        raise CheckpointError(f"model folder {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a model folder")

    if (p / ADAPTER_CONFIG).is_file():
        if base is None:
            raise CheckpointError(
                f"{p} is a LoRA adapter; it needs the base model (set `base:` in the recipe)"
            )
        from .lora import LoraReader

        return LoraReader(p, base)
    if (p / SAFE_INDEX).is_file():
        wm = _read_index(p / SAFE_INDEX)
        return SafetensorsReader(p, _index_files(p / SAFE_INDEX, wm), index=wm)
    if (p / SAFE_SINGLE).is_file():
        return SafetensorsReader(p, [p / SAFE_SINGLE])
    safes = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if any(f.name.startswith("adapter_model.") for f in safes):
        raise CheckpointError(f"{p} holds adapter weights but no {ADAPTER_CONFIG}; cannot read the adapter")
    if safes:
        return SafetensorsReader(p, safes)
    if (p / BIN_INDEX).is_file():
        wm = _read_index(p / BIN_INDEX)
        return BinReader(p, _index_files(p / BIN_INDEX, wm), index=wm)
    if (p / BIN_SINGLE).is_file():
        return BinReader(p, [p / BIN_SINGLE])
    if (p / "adapter_model.bin").is_file():
        raise CheckpointError(f"{p} holds adapter weights but no {ADAPTER_CONFIG}; cannot read the adapter")
    raise CheckpointError(
        f"no model weights in {p}: looked for {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors, {BIN_INDEX}, "
        f"{BIN_SINGLE} and {ADAPTER_CONFIG}"
    )

"""Parse and check a safetensors header without touching tensor data.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data, which
the offsets must tile exactly. Checking the tiling against the file size at open time makes a truncated
download fail before a merge starts, with a message that names the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# safetensors dtype code -> torch dtype; getattr keeps older torch builds working (they lack some fp8).
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}

# A real header is a few MB at most; anything larger is a corrupt length field, not a model.
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # absolute byte offset of the tensor's data in `file`
    nbytes: int = 0


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(entry: object) -> tuple[str, tuple[int, ...], int, int] | None:
    """(dtype code, shape, begin, end) of a header entry, or None when it is malformed."""
    if not isinstance(entry, dict):
        return None
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return None
    return code, tuple(shape), offsets[0], offsets[1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, checked against the file's size. Raises CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path} is not a valid safetensors file: its header claims {n} bytes, the file holds "
                    f"{size} (corrupt or truncated)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")

    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        parsed = _entry(entry)
        if parsed is None:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: bad entry for tensor '{name}' (needs a dtype, a shape "
                "of non-negative integers and two non-negative data_offsets)"
            )
        code, shape, begin, end = parsed
        dtype = DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(f"tensor '{name}' in {path} has dtype {code}, which sefusion cannot read")
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or begin < 0:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: tensor '{name}' {list(shape)} {code} spans "
                f"{end - begin} bytes, expected {want}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of the data but the file holds "
                f"{data_len} bytes of data"
            )
        out[name] = TensorInfo(path, shape, dtype, 8 + n + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: gap or overlap at tensor '{name}'"
            )
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{path} is not a valid safetensors file: the header covers {pos} bytes of data but the file "
            f"holds {data_len}"
        )
    return out

"""Small helpers around checkpoints: size strings, finiteness checks, content hashes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "5GB" (10^9), "1.5GiB" (2^30), "500MB", "20KB" or "1000".

    Raises ValueError on anything else, and on sizes that are not positive.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read size {text!r}: use a number with an optional unit (B, KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB), e.g. 5GB"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and ±Inf entries of a floating tensor (0 for other dtypes). A finite sum (in float32 at least)
    proves there are none in one pass without a boolean temporary; only a non-finite sum (a NaN/Inf, or
    a sum that overflowed) pays for the exact count."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    acc = torch.float32 if tensor.is_floating_point() and tensor.dtype.itemsize <= 4 else None
    total = tensor.sum(dtype=acc) if acc is not None else tensor.sum()
    if bool(torch.isfinite(total).all()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(name: str, tensor: torch.Tensor, file: str | Path) -> None:
    """Raise CheckpointError when a floating tensor holds NaN or ±Inf."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(
            f"tensor '{name}' in {file} has non-finite values ({bad} NaN/Inf); pass --allow-nonfinite "
            "to proceed"
        )


def file_sha256(paths: str | Path | Iterable[str | Path], *, chunk: int = 2**22) -> str:
    """Hex SHA-256 of the files' bytes, concatenated in the given order, read in 4 MiB chunks."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


_SHA_MEMO: dict[tuple[Any, ...], str] = {}


def weights_sha256(files: Sequence[Path]) -> str:
    """`file_sha256` of a model's weight files, memoized per process on their paths, sizes and mtimes."""
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    sha = _SHA_MEMO.get(stamp)
    if sha is None:
        sha = _SHA_MEMO[stamp] = file_sha256(files)
    return sha

"""Progress bars of long loops over tensors (tqdm, imported when a bar is made)."""

from __future__ import annotations

from typing import Any


def progress(total: int, desc: str, quiet: bool) -> Any:
    """A tqdm bar over `total` tensors (off when quiet)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=quiet or None, leave=False)

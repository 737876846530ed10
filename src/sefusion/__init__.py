"""sefusion: model fusion for software-engineering models.

The public API is imported lazily so that `import sefusion` (and `sefusion --help`) stays fast:
torch is loaded only when a merge actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = ["__version__", "merge", "merge_tensors", "SefusionError"]

if TYPE_CHECKING:  # pragma: no cover
    from .engine import merge, merge_tensors
    from .errors import SefusionError


def __getattr__(name: str) -> Any:
    if name in ("merge", "merge_tensors"):
        from . import engine

        return getattr(engine, name)
    if name == "SefusionError":
        from .errors import SefusionError

        return SefusionError
    raise AttributeError(f"module 'sefusion' has no attribute {name!r}")

"""The SE fusion study: scenarios, selection on validation, normalized scores, reports.

`run_study(StudyConfig(...))` runs one scenario end to end; `sefusion study` and `sefusion demo` call it.
"""

from typing import Any

from .grids import BASELINES
from .runner import Study, StudyConfig, run_study
from .scenarios import SCENARIOS, Scenario, StudyError, resolve

__all__ = [
    "BASELINES",
    "FUSION",
    "ROWS",
    "SCENARIOS",
    "Scenario",
    "Study",
    "StudyConfig",
    "StudyError",
    "resolve",
    "run_study",
]


def __getattr__(name: str) -> Any:
    """FUSION and ROWS come from the registry on first use (importing the methods and torch)."""
    if name in ("FUSION", "ROWS"):
        from . import grids

        return getattr(grids, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

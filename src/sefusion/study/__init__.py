"""The SE fusion study: scenarios, selection on validation, normalized scores, reports.

`run_study(StudyConfig(...))` runs one scenario end to end; `sefusion study` and `sefusion demo` call it.
"""

from .grids import BASELINES, FUSION, ROWS
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

"""What the encoder study and the generative study share about their steps: progress lines and timings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sefusion")


class TimedSteps:
    """Mixin: `_progress` logs unless the config is quiet; `_timed` adds a step's seconds to `timings`."""

    cfg: Any
    timings: dict[str, float]

    def _progress(self, msg: str) -> None:
        if not self.cfg.quiet:
            log.info(msg)

    def _timed(self, what: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

"""What the encoder study and the generative study share about their steps: progress lines, timings and
their work handed to the executor as pieces."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .executor import Executor, Piece

log = logging.getLogger("sefusion")


class TimedSteps:
    """Mixin: `_progress` logs unless the config is quiet; `_timed` adds a step's seconds to `timings`;
    `_piece` makes a piece with the config's resources, `_execute` runs pieces on the study's executor."""

    cfg: Any
    timings: dict[str, float]
    executor: Executor

    def _piece(self, key: str, fn: Callable[..., Any], *args: Any, deps: tuple[str, ...] = ()) -> Piece:
        return Piece(key, fn, args, deps, num_cpus=self.cfg.piece_cpus, num_gpus=self.cfg.piece_gpus)

    def _execute(self, what: str, todo: Sequence[Piece], **kwargs: Any) -> dict[str, Any]:
        """The pieces' results, by key, from the executor (its progress bar named `what`)."""
        if hasattr(self.executor, "desc"):
            self.executor.desc = what
        return self.executor.run(todo, **kwargs)

    def _progress(self, msg: str) -> None:
        if not self.cfg.quiet:
            log.info(msg)

    def _timed(self, what: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

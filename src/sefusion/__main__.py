"""`python -m sefusion` and the `sefusion` command. Ctrl-C while the command starts (imports) exits 130
with one line instead of a KeyboardInterrupt traceback; the command then handles signals itself."""

from __future__ import annotations

import os
import signal
from typing import Any


def _interrupted_at_start(signum: int, frame: Any) -> None:
    os.write(2, b"sefusion: interrupted; no output was written\n")
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_at_start)
    from .cli import run

    run()


if __name__ == "__main__":
    main()

"""JSON Lines: one object a line, read once for every reader of a user's JSONL. The reading and line
numbering live here; each caller words its errors (`JsonLinesError.worded`)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import SefusionError


class JsonLinesError(SefusionError, ValueError):
    """A JSONL file that cannot be read (`kind` "read"), a line that is not JSON ("json", the parser's
    message) or not an object ("object", the value's type name)."""

    def __init__(self, path: Path, line: int, kind: str, detail: str) -> None:
        self.path, self.line, self.kind, self.detail = path, line, kind, detail
        super().__init__(self.worded(DEFAULT_WORDS))

    def worded(self, words: Mapping[str, str]) -> str:
        """The message in a caller's words: `words[kind]` formatted with path, line and detail."""
        return words[self.kind].format(path=self.path, line=self.line, detail=self.detail)


DEFAULT_WORDS = {
    "read": "cannot read {path}: {detail}",
    "json": "{path}:{line}: not JSON ({detail})",
    "object": "{path}:{line}: not a JSON object (a {detail})",
}


def json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file, gzip-compressed when named .gz."""
    path = Path(path)
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JsonLinesError(path, n, "json", exc.msg) from None
                if not isinstance(value, dict):
                    raise JsonLinesError(path, n, "object", type(value).__name__)
                yield n, value
    except (OSError, UnicodeDecodeError) as exc:
        raise JsonLinesError(path, n, "read", str(exc)) from None

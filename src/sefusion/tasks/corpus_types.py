"""The records a code corpus is made of."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SefusionError


class CorpusError(SefusionError, ValueError):
    """A corpus cannot be built as asked: unknown language, missing folder, unreadable data set, no apt."""


@dataclass(frozen=True)
class Function:
    """One function of a corpus.

    `code` is the function's source without its doc comment (Python: the def with the docstring
    statement cut out; others: the declaration below the comment), dedented. `docstring` is the first
    paragraph of the cleaned doc comment, its lines joined by spaces ("" when the record comes from a
    data set without one). `path` is the source file relative to its corpus root and is the key the
    train/validation/test split uses. `params` are the parameter names as the signature spells them
    (Python keeps `self`/`cls`, PHP keeps the `$`, Go leaves out the receiver, destructuring patterns
    are left out). `label` is None for mined functions; CodeXGLUE defect records carry their
    `target` there (1: vulnerable/defective, 0: not). Python functions mined from source also keep
    `doc_full`, the whole docstring as `inspect.cleandoc` gives it (doctest examples included), and
    `qualname`, the dotted path from the module (`Class.method`; `f.<locals>.g` when nested); both are
    "" where the source does not give them.
    """

    language: str
    name: str
    code: str
    docstring: str
    path: str
    source: str
    params: tuple[str, ...] = ()
    lines: int = 0
    lineno: int = 0
    label: int | None = None
    doc_full: str = ""
    qualname: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Function:
        return cls(**{**d, "params": tuple(d.get("params", ()))})


@dataclass
class Corpus:
    """Functions of one language plus where they came from.

    `provenance` holds one dict per source: source, package, version, licence, files (source files
    read), extracted (functions found) and functions (functions kept after dedupe and sampling).
    """

    language: str
    functions: list[Function] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.functions)

    def extend(self, other: Corpus) -> None:
        self.functions.extend(other.functions)
        self.provenance.extend(other.provenance)

    def recount(self) -> None:
        """Set each provenance entry's `functions` to the number of kept functions from its source."""
        counts = Counter(f.source for f in self.functions)
        for p in self.provenance:
            p["functions"] = counts.get(p["source"], 0)

"""Train/validation/test splits by source file, and removal of near-identical functions."""

from __future__ import annotations

import hashlib
import keyword
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .corpus_extract import EXTENSIONS
from .corpus_types import CorpusError, Function

SPLITS = ("train", "validation", "test")


def _unit(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")


def split_by_file(
    functions: Sequence[Function], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, list[Function]]:
    """{"train", "validation", "test"}: each source file (`Function.path`) in exactly one split.

    Files are ordered by a hash of (seed, path) and cut where the running count of functions crosses
    the fractions, so the splits hold close to the asked share of functions and the same files and
    seed always give the same splits. Functions keep their order within a split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CorpusError(
            f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}"
        )
    sizes = Counter(f.path for f in functions)
    total = sum(sizes.values())
    bounds = [fractions[0], fractions[0] + fractions[1], float("inf")]
    split_of, done = {}, 0
    for path in sorted(sizes, key=lambda p: (_unit(seed, p), p)):
        middle = (done + sizes[path] / 2) / total
        split_of[path] = next(i for i, b in enumerate(bounds) if middle < b)
        done += sizes[path]
    out: dict[str, list[Function]] = {s: [] for s in SPLITS}
    for f in functions:
        out[SPLITS[split_of[f.path]]].append(f)
    return out


_STRING = r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|`(?:\\.|[^`\\])*`'
_LINE_COMMENT = {"python": "#", "ruby": "#", "php": "//|#"}
_TOKEN = {
    lang: re.compile(
        rf"(?P<c>(?:{_LINE_COMMENT.get(lang, '//')})[^\n]*|/\*[\s\S]*?\*/)|(?P<s>{_STRING})"
        r"|(?P<i>\$?[A-Za-z_][A-Za-z0-9_]*)|(?P<n>\d[\w.]*)|(?P<o>\S)"
    )
    for lang in EXTENSIONS
}


def _words(text: str) -> set[str]:
    return set(text.split())


_KEYWORDS = {
    "python": set(keyword.kwlist) | {"self", "cls", "print", "len", "range", "isinstance", "str", "int"},
    "go": _words("break case chan const continue default defer else fallthrough for func go goto if import "
              "interface map package range return select struct switch type var nil true false err len "
              "make new append int string bool byte error"),
    "java": _words("abstract boolean break byte case catch char class continue default do double else enum "
                "extends final finally float for if implements import instanceof int interface long new "
                "null package private protected public return short static super switch synchronized this "
                "throw throws try void volatile while true false var String Object"),
    "javascript": _words("async await break case catch class const continue debugger default delete do else "
                      "export extends false finally for function if import in instanceof let new null "
                      "return super switch this throw true try typeof undefined var void while yield of "
                      "arguments"),
    "php": _words("abstract and array as break case catch class clone const continue declare default do echo "
               "else elseif empty extends final finally fn for foreach function global if implements "
               "instanceof interface isset list match new null or private protected public return static "
               "switch throw trait try unset use var while yield true false self parent $this"),
    "ruby": _words("alias and begin break case class def defined do else elsif end ensure false for if in "
                "module next nil not or redo rescue retry return self super then true undef unless until "
                "when while yield raise puts attr_reader"),
}  # fmt: skip


def normalized_key(f: Function) -> str:
    """Hash of the code with comments and layout dropped and names renamed in order of appearance, so
    reformatted copies and copies with renamed variables, parameters or function name share a key.

    Keywords stay, and so do member names (after `.`, `->`, `::`, `@`): a renaming that keeps the
    meaning cannot touch them, and getters of different fields are different functions.
    """
    names: dict[str, str] = {}
    keywords = _KEYWORDS.get(f.language, set())
    out: list[str] = []
    for m in _TOKEN.get(f.language, _TOKEN["java"]).finditer(f.code):
        kind, tok = m.lastgroup, m.group()
        if kind == "c":
            continue
        if kind == "i" and tok not in keywords:
            prev, prev2 = (out[-1] if out else ""), (out[-2] if len(out) > 1 else "")
            member = prev in (".", "@") or (prev, prev2) in ((">", "-"), (":", ":"))
            if not member:
                tok = names.setdefault(tok, f"v{len(names)}")
        out.append(tok)
    return f.language + ":" + hashlib.blake2b(" ".join(out).encode(), digest_size=12).hexdigest()


def dedupe(functions: Iterable[Function]) -> list[Function]:
    """Drop functions whose `normalized_key` was seen before; the first one stays."""
    seen: set[str] = set()
    out = []
    for f in functions:
        k = normalized_key(f)
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


def drop_leaks(splits: dict[str, list[Function]]) -> dict[str, list[Function]]:
    """Remove from validation what duplicates train, and from test what duplicates train or validation
    (for splits made elsewhere, e.g. a data set's own partitions; `load_corpus` output has none)."""
    seen = {normalized_key(f) for f in splits.get("train", [])}
    out = {"train": list(splits.get("train", []))}
    for name in ("validation", "test"):
        keys = [(normalized_key(f), f) for f in splits.get(name, [])]
        out[name] = [f for k, f in keys if k not in seen]
        seen |= {k for k, _ in keys}
    return out

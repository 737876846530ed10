"""Readers for published function-level data sets, so their users run the same study.

- CodeSearchNet JSONL (`code`, `docstring`, `language`; optional `repo`, `path`, `func_name`): one
  `Function` per line, docstring cut to its first paragraph, Python docstrings cut out of `code`.
- CodeXGLUE defect detection JSONL (Devign: `func`, `target`; optional `project`, `commit_id`, `idx`):
  C functions without docstrings; `target` goes to `Function.label` (one record type for every task).

Either file may be gzip-compressed (`.gz`). The split key `path` is `repo/path` for CodeSearchNet and
`project/commit_id` for CodeXGLUE (falling back to `file#line`), so a data set's functions from one file
or commit stay in one split.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..jsonl import JsonLinesError, json_lines
from .corpus_extract import canonical_language, clean_block_doc, first_paragraph, params_of
from .corpus_types import Corpus, CorpusError, Function

_WORDS = {
    "read": "cannot read {path}: {detail}",
    "json": "{path}:{line}: not a JSON line ({detail})",
    "object": "{path}:{line}: expected a JSON object, got {detail}",
}


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file (.gz too); CorpusError names the line."""
    try:
        yield from json_lines(path)
    except JsonLinesError as exc:
        raise CorpusError(exc.worded(_WORDS)) from None


def _strip_python_docstring(code: str) -> str:
    try:
        tree = ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return code
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None or len(fn.body) < 2 or ast.get_docstring(fn, clean=False) is None:
        return code
    doc = fn.body[0]
    if doc.lineno == fn.lineno or fn.body[1].lineno == doc.end_lineno:
        return code
    lines = textwrap.dedent(code).splitlines()
    return "\n".join(lines[: doc.lineno - 1] + lines[doc.end_lineno :])


def _key(name: str) -> str:
    return name.split(".")[-1].split("::")[-1]


def read_codesearchnet(path: str | Path, *, language: str | None = None) -> Corpus:
    """CodeSearchNet-style JSONL; `language` keeps only that language's records (and fills a missing field)."""
    path = Path(path)
    want = canonical_language(language) if language else None
    functions = []
    for i, rec in jsonl_records(path):
        if "code" not in rec:
            raise CorpusError(f"{path}:{i}: CodeSearchNet record without a 'code' field")
        if not (rec.get("language") or want):
            raise CorpusError(
                f"{path}:{i}: record without a 'language' field; say which language the file holds"
            )
        lang = canonical_language(rec.get("language") or want)
        if want and lang != want:
            continue
        code, doc = str(rec["code"]), str(rec.get("docstring") or "")
        if lang == "python":
            code, doc = _strip_python_docstring(code), first_paragraph(textwrap.dedent(doc).strip())
        else:
            doc = clean_block_doc("/**\n" + doc + "\n*/") if doc else ""
        where = "/".join(str(rec[k]) for k in ("repo", "path") if rec.get(k)) or f"{path.name}#{i}"
        name = _key(str(rec.get("func_name") or ""))
        n = code.count("\n") + 1
        functions.append(
            Function(lang, name, code, doc, where, f"codesearchnet:{path.name}", params_of(lang, code), n, i)
        )
    prov = {
        "source": f"codesearchnet:{path.name}",
        "package": "CodeSearchNet",
        "version": None,
        "licence": "per repository (see the data set's licence files)",
        "files": len({f.path for f in functions}),
        "extracted": len(functions),
        "functions": len(functions),
    }
    return Corpus(want or (functions[0].language if functions else "python"), functions, [prov])


_C_SIGNATURE = re.compile(r"([A-Za-z_]\w*)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)\s*(?:\w+\s*)*\{", re.S)


def _c_signature(code: str) -> tuple[str, tuple[str, ...]]:
    m = _C_SIGNATURE.search(code)
    if not m:
        return "", ()
    params = []
    for p in m.group(2).split(","):
        names = re.findall(r"[A-Za-z_]\w*", re.sub(r"\[[^\]]*\]", "", p))
        if names and not (len(names) == 1 and names[0] == "void"):
            params.append(names[-1])
    return m.group(1), tuple(params)


def read_codexglue_defect(path: str | Path) -> Corpus:
    """CodeXGLUE defect-detection JSONL (`func`, `target`) as C functions with `label` = target."""
    path = Path(path)
    functions = []
    for i, rec in jsonl_records(path):
        if "func" not in rec or "target" not in rec:
            raise CorpusError(f"{path}:{i}: CodeXGLUE defect record needs 'func' and 'target' fields")
        try:
            label = int(rec["target"])
        except (TypeError, ValueError):
            raise CorpusError(f"{path}:{i}: 'target' must be 0 or 1, got {rec['target']!r}") from None
        code = str(rec["func"])
        name, params = _c_signature(code)
        where = "/".join(str(rec[k]) for k in ("project", "commit_id") if rec.get(k)) or f"{path.name}#{i}"
        src = f"codexglue-defect:{path.name}"
        functions.append(Function("c", name, code, "", where, src, params, code.count("\n") + 1, i, label))
    prov = {
        "source": f"codexglue-defect:{path.name}",
        "package": "CodeXGLUE defect detection (Devign)",
        "version": None,
        "licence": "see the data set's terms",
        "files": len({f.path for f in functions}),
        "extracted": len(functions),
        "functions": len(functions),
    }
    return Corpus("c", functions, [prov])


def read_jsonl(path: str | Path, *, language: str | None = None) -> Corpus:
    """Either format, told apart by the first record's fields."""
    path = Path(path)
    first = next(jsonl_records(path), None)
    if first is None:
        raise CorpusError(f"{path} holds no records")
    keys = first[1].keys()
    if "func" in keys and "target" in keys:
        if language and language != "c":
            raise CorpusError(f"{path} is CodeXGLUE defect data (C functions), not {language}")
        return read_codexglue_defect(path)
    if "code" in keys:
        return read_codesearchnet(path, language=language)
    raise CorpusError(
        f"{path}: records have neither CodeSearchNet fields (code, docstring, language) nor CodeXGLUE "
        f"defect fields (func, target); found {sorted(keys)}"
    )

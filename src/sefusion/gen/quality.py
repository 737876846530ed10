"""Quality of generated code: whether it parses, and ruff's static-analysis findings by category.

Every generation is written to its own file in a temporary folder and ruff checks them all in one run
with a fixed rule selection (no configuration file is read). Findings are counted per rule category
(the code's selected prefix: F401 -> F, PLR0912 -> PLR) and reported per 100 generated functions that
parse. When a generation continues a prompt (HumanEval: signature and docstring), the prompt is
analysed with it, so names resolve, but only findings on the generated lines count. ruff reads Python
only: code in another language gets its parse rate (tree-sitter, `analyze_language`) and no findings
(None: not measured, never 0).
"""

from __future__ import annotations

import ast
import json
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SefusionError

# pylint's own categories come through ruff's PL rules (convention, error, refactor, warning)
CATEGORIES = {
    "F": "pyflakes (undefined or unused names, ...)",
    "E": "pycodestyle errors",
    "W": "pycodestyle warnings",
    "B": "flake8-bugbear (likely bugs)",
    "SIM": "flake8-simplify",
    "C90": "mccabe (too complex)",
    "UP": "pyupgrade (outdated syntax)",
    "N": "pep8-naming",
    "RET": "flake8-return",
    "PLC": "pylint convention",
    "PLE": "pylint error",
    "PLR": "pylint refactor",
    "PLW": "pylint warning",
}
SELECT = ("E", "W", "F", "B", "SIM", "C90", "UP", "N", "RET", "PL")
IGNORE = ("W292",)  # no newline at end of file: an artefact of cutting the generation


@dataclass(frozen=True)
class Analysis:
    parses: bool
    # rule code -> count on the generated lines; None: no analyzer for the code's language
    findings: dict[str, int] | None = field(default_factory=dict)


def parses(code: str) -> bool:
    """Whether `code` is syntactically valid Python (ast)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escapes warn: still valid code
            ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def category(code: str) -> str:
    """The rule's category: its longest prefix in CATEGORIES (C901 -> C90)."""
    return max((c for c in CATEGORIES if code.startswith(c)), key=len, default=code.rstrip("0123456789"))


def _ruff(folder: Path) -> list[dict]:
    from ruff.__main__ import find_ruff_bin

    cmd = [find_ruff_bin(), "check", "--isolated", "--no-cache", "--exit-zero", "--output-format", "json"]
    cmd += ["--select", ",".join(SELECT), "--ignore", ",".join(IGNORE), "--target-version", "py310", "."]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise SefusionError(f"ruff failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout or "[]")


def analyze(codes: Sequence[str], prompts: Sequence[str] | None = None) -> list[Analysis]:
    """Per generation: whether prompt + code parses, and ruff's findings on the code's own lines."""
    prompts = prompts if prompts is not None else [""] * len(codes)
    texts = [p + c for p, c in zip(prompts, codes, strict=True)]
    ok = [parses(t) for t in texts]
    counts: list[Counter] = [Counter() for _ in codes]
    with tempfile.TemporaryDirectory(prefix="sefusion-quality-") as tmp:
        for i, text in enumerate(texts):
            if ok[i]:
                Path(tmp, f"g{i}.py").write_text(text.rstrip("\n") + "\n", encoding="utf-8")
        for finding in _ruff(Path(tmp)) if any(ok) else []:
            i = int(Path(finding["filename"]).stem[1:])
            generated = finding["location"]["row"] > prompts[i].count("\n")
            if finding.get("code") and generated:
                counts[i][finding["code"]] += 1
    return [Analysis(p, dict(sorted(c.items()))) for p, c in zip(ok, counts, strict=True)]


def analyze_language(codes: Sequence[str], lang: str) -> list[Analysis]:
    """`analyze` for Python; for another language, whether each code parses (tree-sitter) and no
    findings (ruff reads Python only)."""
    if lang == "python":
        return analyze(codes)
    from ..tasks.generative import parses as parses_in

    return [Analysis(parses_in(c, lang), None) for c in codes]


def quality_table(codes: Sequence[str] | Sequence[Analysis], prompts: Sequence[str] | None = None) -> dict:
    """{functions, parsed, parse_rate, findings_per_100: {category: findings per 100 parsed functions}};
    the findings are None where the code's language has no analyzer."""
    analyses = [c if isinstance(c, Analysis) else None for c in codes]
    if not all(analyses):
        analyses = analyze(codes, prompts)  # type: ignore[arg-type]
    parsed = sum(a.parses for a in analyses)
    table = {
        "functions": len(analyses),
        "parsed": parsed,
        "parse_rate": parsed / len(analyses) if analyses else 0.0,
    }
    if any(a.findings is None for a in analyses):
        return {**table, "findings_per_100": None, "findings_total_per_100": None}
    by_category: Counter = Counter()
    for a in analyses:
        for code, n in (a.findings or {}).items():
            by_category[category(code)] += n
    per_100 = {c: round(100 * n / parsed, 2) for c, n in sorted(by_category.items())} if parsed else {}
    total = round(100 * sum(by_category.values()) / parsed, 2) if parsed else 0.0
    return {**table, "findings_per_100": per_100, "findings_total_per_100": total}

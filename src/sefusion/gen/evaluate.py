"""Score completions of HumanEval-format problems: run each in the sandbox, pass@1, code quality, results.

The engine behind `sefusion eval`: completions come from a file or from a causal LM
(sefusion.models.causal.generate, imported only then), every program runs through sefusion.sandbox on
every core, and the results folder is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, SefusionError
from ..sandbox import Limits, Outcome, mechanisms, run_all
from .problems import STOP, Problem, harness, pass_at_1, program, test_error
from .quality import Analysis, analyze, quality_table

log = logging.getLogger("sefusion")


@dataclass(frozen=True)
class Result:
    task_id: str
    sample: int
    status: str
    passed: bool
    detail: str
    parses: bool
    findings: dict[str, int]
    wall_s: float


def _check_ids(problems: Sequence[Problem], completions: Sequence[tuple[str, str]]) -> dict[str, Problem]:
    by_id = {p.task_id: p for p in problems}
    unknown = sorted({t for t, _ in completions} - by_id.keys())
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SefusionError(f"completions for task_id {unknown[0]!r}{more}: not among the problems")
    missing = len(by_id.keys() - {t for t, _ in completions})
    if missing:
        log.warning("sefusion: warning: %d problems have no completion; pass@1 is over the others", missing)
    return by_id


def _outcomes(
    by_id: dict[str, Problem],
    completions: Sequence[tuple[str, str]],
    limits: Limits,
    workers: int | None,
    progress: bool,
) -> list[Outcome]:
    """One sandbox run per completion; a problem whose test does not compile is an error, not run."""
    broken = {t: why for t, p in by_id.items() if (why := test_error(p))}
    runnable = [(i, harness(program(by_id[t], c))) for i, (t, c) in enumerate(completions) if t not in broken]
    desc = "running tests" if progress else None
    ran = run_all([p for _, p in runnable], limits=limits, workers=workers, desc=desc)
    outcomes: list[Outcome | None] = [None] * len(completions)
    for (i, _), outcome in zip(runnable, ran, strict=True):
        outcomes[i] = outcome  # a completion that does not compile fails inside the harness, like any error
    for i, (t, _) in enumerate(completions):
        if t in broken:
            outcomes[i] = Outcome("error", broken[t], 0.0)
    return outcomes  # type: ignore[return-value]


def score(
    problems: Sequence[Problem],
    completions: Sequence[tuple[str, str]],
    *,
    limits: Limits = Limits(),  # noqa: B008 - frozen dataclass
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[Result], dict[str, Any]]:
    """(one Result per completion, in order; the summary: pass@1, statuses, quality table, limits)."""
    by_id = _check_ids(problems, completions)
    outcomes = _outcomes(by_id, completions, limits, workers, progress)
    analyses = analyze([c for _, c in completions], [by_id[t].prompt for t, _ in completions])
    samples: Counter = Counter()
    results, passed = [], defaultdict(list)
    for (task_id, _), outcome, analysis in zip(completions, outcomes, analyses, strict=True):
        results.append(_result(task_id, samples[task_id], outcome, analysis))
        samples[task_id] += 1
        passed[task_id].append(outcome.passed)
    summary = {
        "pass@1": pass_at_1(passed),
        "problems": len(passed),
        "completions": len(completions),
        "statuses": dict(Counter(r.status for r in results)),
        "quality": quality_table(analyses),
        "limits": asdict(limits),
        "sandbox": {name: why or "on" for name, why in mechanisms().items()},
    }
    return results, summary


def _result(task_id: str, sample: int, outcome: Outcome, analysis: Analysis) -> Result:
    return Result(
        task_id, sample, outcome.status, outcome.passed, outcome.detail, analysis.parses, analysis.findings or {},
        round(outcome.wall_s, 3),
    )  # fmt: skip


def generate_completions(
    model: str,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat: bool = False,
    precision: str = "bf16",
) -> list[tuple[str, str]]:
    """Greedy completions of every problem's prompt by the causal LM `model` (a folder or a base's name),
    its weights in `precision` (bf16 or fp32)."""
    import torch

    from ..models.causal import generate, load_causal

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    lm, tokenizer = load_causal(model, dtype=dtype)
    texts = generate(
        lm, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens, stop=STOP,
        batch_size=batch_size, chat=chat, desc="generating",
    )  # fmt: skip
    return [(p.task_id, t) for p, t in zip(problems, texts, strict=True)]


def check_out(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")


def write_results(
    out: Path,
    results: Sequence[Result],
    summary: dict,
    completions: Sequence[tuple[str, str]],
    overwrite: bool,
) -> None:
    """results.jsonl, completions.jsonl and summary.json, written to a sibling folder renamed into place."""
    files = {
        "results.jsonl": [asdict(r) for r in results],
        "completions.jsonl": [{"task_id": t, "completion": c} for t, c in completions],
    }
    write_folder(out, files, summary, overwrite)


def write_folder(out: Path, files: Mapping[str, Sequence[Any]], summary: dict, overwrite: bool) -> None:
    """JSONL files (name -> records) and summary.json, written to a sibling folder renamed into place."""
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, records in files.items():
            _jsonl(tmp / name, records)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonl(path: Path, records: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def summary_text(summary: dict) -> str:
    """pass@1, the statuses, and the quality table in a few lines."""
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(summary["statuses"].items()))
    q = summary["quality"]
    findings = ", ".join(f"{c} {v:g}" for c, v in q["findings_per_100"].items()) or "none"
    return (
        f"pass@1 {summary['pass@1']:.4f} over {summary['problems']} problems "
        f"({summary['completions']} completions: {statuses})\n"
        f"parses {q['parsed']}/{q['functions']}; ruff findings per 100 functions: "
        f"{q['findings_total_per_100']:g} ({findings})"
    )

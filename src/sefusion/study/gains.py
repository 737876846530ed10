"""Scores that show failure: the gain kept over the pretrained row and the cells below a floor.

A normalized score fused / expert hides failure when the frozen base already scores most of what the
expert does (search: the base keeps 0.86 of the experts' MRR). The gain kept,
(fused - pretrained) / (expert - pretrained), is 1 when fusion keeps all that fine-tuning added, 0 when it
keeps none and negative when the fused model is worse than not fine-tuning at all. A cell is flagged
when its score is below the `pretrained` row's (fusion undid the fine-tuning and more) or below the task's
chance level (the test split's majority share for classification, H_n/n for retrieval).

Everything here reads a study's `results.json` (rows with "method" and "test" scores; "experts" with
"test" and "chance"), so `sefusion summary` and the reports compute it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import uncertainty as U
from .uncertainty import B_DEFAULT

PRETRAINED = "pretrained"
EXPERT = "individual"
BELOW_PRETRAINED = "below pretrained"
BELOW_CHANCE = "below chance"
_SKIP = (PRETRAINED, EXPERT)  # rows that are the references themselves


def gain_kept(fused: float, expert: float, pretrained: float) -> float | None:
    """(fused - pretrained) / (expert - pretrained); None when the expert does not beat pretrained (the
    gain is not defined: there was nothing to keep)."""
    gain = expert - pretrained
    if gain <= 0:
        return None
    return (fused - pretrained) / gain


def flags(score: float, pretrained: float | None, chance: float | None) -> list[str]:
    """Why a cell is suspect: below the pretrained row's score, below chance (point estimates)."""
    out = []
    if pretrained is not None and score < pretrained:
        out.append(BELOW_PRETRAINED)
    if chance is not None and score < chance:
        out.append(BELOW_CHANCE)
    return out


def _row(results: Mapping[str, Any], method: str) -> Mapping[str, Any] | None:
    return next((r for r in results.get("rows", ()) if r.get("method") == method), None)


def row_readings(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per fusion/baseline row, per task: {"score", "gain_kept", "flags"}; the `pretrained` and
    `individual` rows are the references and are left out."""
    pre = _row(results, PRETRAINED)
    pre_test = (pre or {}).get("test") or {}
    experts = results.get("experts") or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results.get("rows", ()):
        if row.get("method") in _SKIP:
            continue
        cells = {}
        for task, score in (row.get("test") or {}).items():
            if score is None:
                continue
            e = experts.get(task) or {}
            p = pre_test.get(task)
            g = gain_kept(score, e["test"], p) if p is not None and e.get("test") is not None else None
            cells[task] = {"score": score, "gain_kept": g, "flags": flags(score, p, e.get("chance"))}
        out[str(row["method"])] = cells
    return out


def row_summary(cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A row over its tasks: average and worst gain kept (over tasks where it is defined), and how many
    cells are below the pretrained row and below chance."""
    gains = [c["gain_kept"] for c in cells.values() if c["gain_kept"] is not None]
    return {
        "avg_gain_kept": sum(gains) / len(gains) if gains else None,
        "worst_gain_kept": min(gains) if gains else None,
        "below_pretrained": sum(BELOW_PRETRAINED in c["flags"] for c in cells.values()),
        "below_chance": sum(BELOW_CHANCE in c["flags"] for c in cells.values()),
        "tasks": len(cells),
    }


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def summary_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The gain-kept and failure columns of `sefusion summary`: per row and scenario, the average and
    worst gain kept, and the cells below the pretrained row / below chance (out of the tasks)."""
    readings = [{m: row_summary(c) for m, c in row_readings(res).items()} for res in runs]
    methods: list[str] = []
    for r in readings:
        methods += [m for m in r if m not in methods]
    if not methods:
        return []
    names = [str(res.get("scenario", "?")) for res in runs]
    header = ["method"] + [f"{n}: {col}" for n in names for col in ("gain kept (worst)", "< pre, < chance")]
    lines = [
        "Gain kept, (fused − pretrained) / (expert − pretrained), averaged over the tasks (its worst task);",
        "tasks scoring below the `pretrained` row and below chance, of the scenario's tasks:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for m in methods:
        cells = [m]
        for r in readings:
            s = r.get(m)
            if s is None:
                cells += ["–", "–"]
                continue
            n = s["tasks"]
            cells += [f"{_fmt(s['avg_gain_kept'])} ({_fmt(s['worst_gain_kept'])})",
                      f"{s['below_pretrained']}/{n}, {s['below_chance']}/{n}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def task_intervals(
    clusters: Mapping[str, Sequence[str]],
    rows: Mapping[str, Mapping[str, Sequence[float]]],
    pairs: Sequence[tuple[str, str]] = (),
    *,
    b: int = B_DEFAULT,
) -> dict[str, dict[str, Any]]:
    """From per-example test scores (`rows`: row -> task -> scores; `clusters`: task -> each example's
    source file), per task: each row's interval, and for each fusion row its normalized score and gain
    kept with intervals (against the `individual` and `pretrained` rows), whether it is significantly
    below the pretrained row, and the paired difference of each pair of rows (a, b) in `pairs`. All on
    the same cluster resamples of that task's examples."""
    out: dict[str, dict[str, Any]] = {}
    for task, files in clusters.items():
        have = {r: per[task] for r, per in rows.items() if task in per}
        cells: dict[str, Any] = {
            r: {"interval": U.interval(x, files, b=b).as_dict()} for r, x in have.items()
        }
        expert, pre = have.get(EXPERT), have.get(PRETRAINED)
        for r, x in have.items():
            if expert is not None and r != EXPERT:  # pretrained too: how much the frozen base already scores
                cells[r]["normalized"] = U.normalized(x, expert, files, b=b).as_dict()
            if r in _SKIP:
                continue
            if pre is not None:
                d = U.paired_difference(x, pre, files, b=b)
                cells[r]["below_pretrained_significant"] = bool(d.significant and d.estimate < 0)
            if expert is not None and pre is not None:
                cells[r]["gain_kept"] = U.gain_kept(x, expert, pre, files, b=b).as_dict()
        diffs = {
            f"{a} - {c}": difference(have[a], have[c], files, b=b)
            for a, c in pairs
            if a in have and c in have
        }
        out[task] = {"rows": cells, "differences": diffs}
    return out


def difference(
    a: Sequence[float], c: Sequence[float], clusters: Sequence[str] | None, *, b: int = B_DEFAULT
) -> dict[str, Any]:
    """The paired difference a - c of two rows on the same examples, as results.json keeps it."""
    d = U.paired_difference(a, c, clusters, b=b)
    return {**d.as_dict(), "significant": d.significant}


def task_facts(data: Any, spec: Any, *, b: int = B_DEFAULT, with_scores: bool = False) -> dict[str, Any]:
    """What a report states about a task's test data besides the models: its data fingerprint, how many
    source files its test examples come from, and its no-training baseline with a cluster interval
    (`with_scores`: also the baseline's per-example scores, as "baseline_scores")."""
    from ..tasks.base import data_fingerprint, example_clusters
    from ..tasks.baselines import no_training_baseline

    test = list(data.splits.get("test") or [])
    files = example_clusters(test)
    base = no_training_baseline(data, spec)
    out = {
        "fingerprint": data.fingerprint or data_fingerprint(data),
        "test_examples": len(test),
        "test_files": len(set(files)),
        "baseline": {"name": base["baseline"], **U.interval(base["per_example"], files, b=b).as_dict()},
    }
    if with_scores:
        out["baseline_scores"] = list(base["per_example"])
    return out


__all__ = ["BELOW_CHANCE", "BELOW_PRETRAINED", "flags", "gain_kept", "row_readings", "row_summary",
           "summary_lines", "task_facts", "task_intervals"]  # fmt: skip

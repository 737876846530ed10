"""The generative study's report: results.json, scores.json, report.md and its plots in the scenario's
folder."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import _comparisons_section, _fmt, _interval, _mb, _params, _pyplot, _table, plot_normalized
from .uncertainty import format_interval

EXPERT_VS_BASE = "individual - pretrained"
PLOTS = ("normalized.png", "storage.png")  # what write_gen_report draws; report.md shows them


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def _clean(obj: Any) -> Any:
    """NaN as None, so results.json stays standard JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_gen_report(results: Mapping[str, Any], scores_document: Any, out: Path) -> None:
    _write(out / "results.json", json.dumps(_clean(results), indent=1) + "\n")
    if scores_document is not None:
        _write(out / "scores.json", json.dumps(_clean(scores_document)) + "\n")
    plot_normalized(results, out)
    plot_storage(results, out)
    _write(out / "report.md", render_gen_markdown(results))


def plot_storage(results: Mapping[str, Any], out: Path) -> str:
    """storage.png: each row's average normalized test score against the bytes that serve every task
    with it (one model, a bundle, or the base with its adapters)."""
    plt = _pyplot()
    rows = [r for r in results["rows"] if r.get("storage_bytes") and r.get("avg_normalized") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        x, y = r["storage_bytes"] / 1e6, r["avg_normalized"]
        ax.scatter([x], [y], s=18)
        ax.annotate(r["method"], (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("MB to serve every task")
    ax.set_ylabel("average normalized test score")
    ax.set_title(f"{results['scenario']}: score against storage ({results['budget']} budget)")
    fig.tight_layout()
    fig.savefig(out / "storage.png", dpi=110)
    plt.close(fig)
    return "storage.png"


def _reading_cell(row: Mapping[str, Any], task: str) -> str:
    r = (row.get("readings") or {}).get(task) or {}
    score = row["test"].get(task)
    text = _interval(r["interval"]) if r.get("interval") else _fmt(score)
    if row["method"] not in ("pretrained", "individual"):
        norm = r.get("normalized") or {}
        text += f"; norm {_fmt(norm.get('estimate', row['normalized'].get(task)))}"
        kept = r.get("gain_kept")
        text += f"; kept {_fmt(kept.get('estimate')) if kept else '–'}"
    flags = r.get("flags") or []
    return text + (f" ({', '.join(flags)})" if flags else "")


def _main_table(results: Mapping[str, Any]) -> list[str]:
    tasks: Sequence[str] = results["tasks"]
    metrics = {t: results["experts"][t]["metric"] for t in tasks}
    header = ["row", *[f"{t} ({metrics[t]})" for t in tasks], "avg norm.", "storage", "parameters"]
    body = [[r["method"], *[_reading_cell(r, t) for t in tasks], _fmt(r["avg_normalized"]),
             _mb(r["storage_bytes"]), _params(r["params"])] for r in results["rows"]]  # fmt: skip
    undefined = [t for t in tasks if not results["experts"][t].get("test")]
    note = (
        ["", f"avg norm. is over {len(tasks) - len(undefined)} of {len(tasks)} tasks: the expert scores 0 on "
         f"{', '.join(undefined)}, where no normalized score exists."]
        if undefined else []
    )  # fmt: skip
    return _table(header, body) + note


def _quality_table(results: Mapping[str, Any]) -> list[str]:
    cols = sorted({t for r in results["rows"] for t in r.get("quality", {})})
    if not cols:
        return []
    body = []
    for r in results["rows"]:
        cells = []
        for t in cols:
            q = r.get("quality", {}).get(t) or {}
            cells.append(_quality_cell(q) if q.get("parse_rate") is not None else "–")
        body.append([r["method"], *cells])
    head = ["## Quality of the generated code", "",
            "Parse rate / ruff findings per 100 parsed functions of each row's test replies, each with its 95% "
            "cluster-bootstrap interval. ruff reads Python only: code in another language gets its parse "
            "rate from tree-sitter and no findings (–).", ""]  # fmt: skip
    return head + _table(["row", *cols], body) + [""]


def _defined(d: Mapping[str, Any]) -> bool:
    """Whether an interval's estimate exists (findings per 100 parsed functions of no parsed function: no;
    NaN in memory, null once written)."""
    est = d.get("estimate")
    return est is not None and est == est


def _measure(q: Mapping[str, Any], key: str, digits: int) -> str:
    """A quality measure with its interval where the results carry one ('–' where it is undefined)."""
    iv = (q.get("intervals") or {}).get(key)
    if iv is None:
        return _fmt(q.get(key), digits)
    return format_interval(iv, digits) if _defined(iv) else "–"


def _quality_cell(q: Mapping[str, Any]) -> str:
    return f"{_measure(q, 'parse_rate', 3)} / {_measure(q, 'findings_total_per_100', 1)}"


def _difference(d: Mapping[str, Any], digits: int) -> str:
    if not _defined(d):
        return "–"
    return format_interval(d, digits) + (" *" if d.get("significant") else "")


def _humaneval_quality_differences(results: Mapping[str, Any]) -> list[str]:
    comp = results.get("humaneval_quality_comparisons") or {}
    if not comp:
        return []
    body = [[pair, _difference(d["parse_rate"], 3), _difference(d["findings_total_per_100"], 1)]
            for pair, d in comp.items()]  # fmt: skip
    return [
        "Paired differences of HumanEval's code quality (the same problems, the same resamples); * its "
        "interval excludes 0.", "",
        *_table(["a − b", "parse rate", "findings/100"], body), "",
    ]  # fmt: skip


def _humaneval_table(results: Mapping[str, Any]) -> list[str]:
    rows = [r for r in results["rows"] if r.get("humaneval")]
    if not rows:
        return []
    body = []
    for r in rows:
        he = r["humaneval"]
        q = he.get("quality") or {}
        score = _interval(he["interval"]) if he.get("interval") else _fmt(he["score"])
        body.append([r["method"], score, he["n"], _measure(q, "parse_rate", 3),
                     _measure(q, "findings_total_per_100", 1)])  # fmt: skip
    served = results.get("humaneval_served_by")
    return [
        "## HumanEval pass@1 (held-out)", "",
        f"Rows with one body per task (individual, bundles) answer with {served}'s.", "",
        *_table(["row", "pass@1 [95%]", "problems", "parse rate [95%]", "findings/100 [95%]"], body), "",
        *_humaneval_quality_differences(results),
    ]  # fmt: skip


def _experts_table(results: Mapping[str, Any]) -> list[str]:
    """Each expert against the base prompted on its own test metric: clearly above it only where the
    paired interval of the difference lies above 0."""
    by = {r["method"]: r for r in results["rows"]}
    if "pretrained" not in by or "individual" not in by:
        return []
    body = []
    for t in results["tasks"]:
        d = (results.get("comparisons") or {}).get(t, {}).get(EXPERT_VS_BASE)
        above = "–" if d is None else "yes" if d["significant"] and d["estimate"] > 0 else "no"
        body.append([t, results["experts"][t]["metric"], _task_score(by["individual"], t),
                     _task_score(by["pretrained"], t), _interval(d) if d else "–", above])  # fmt: skip
    head = ["## Experts against the base", "",
            "Each task's LoRA expert against the base prompted, on the task's test metric; the difference "
            "with its paired 95% interval (same cluster resamples).", ""]  # fmt: skip
    return head + _table(
        ["task", "metric", "expert", "pretrained", "expert − pretrained", "clearly above"], body
    )


def _task_score(row: Mapping[str, Any], task: str) -> str:
    iv = ((row.get("readings") or {}).get(task) or {}).get("interval")
    return _interval(iv) if iv else _fmt(row["test"].get(task))


def _differences(results: Mapping[str, Any]) -> list[str]:
    """The paired differences of every task, and of HumanEval where the scenario scores it."""
    he = results.get("humaneval_comparisons") or {}
    tasks = [*results["tasks"], *(["humaneval"] if he else [])]
    comp = {**(results.get("comparisons") or {}), **({"humaneval": he} if he else {})}
    return _comparisons_section({"tasks": tasks, "comparisons": comp})


def _compute_line(compute: Mapping[str, float] | None) -> str:
    if not compute:
        return ""
    total = compute["training"] + compute["scoring"]
    return (
        f"Finished pieces over every run of this folder: {total:.0f} s ({total / 3600:.1f} h; training "
        f"{compute['training']:.0f} s, scoring {compute['scoring']:.0f} s; `compute.jsonl`)."
    )


def render_gen_markdown(results: Mapping[str, Any]) -> str:
    b = results["budget_settings"]
    lines = [
        f"# Generative fusion study: {results['scenario']}", "", results["description"], "",
        f"Base `{results['base']}` (sha256 {results['base_sha256'][:16]}...), budget **{results['budget']}**: "
        f"{b['steps']} LoRA steps of {b['batch']} a task (r={b['r']}, alpha={b['alpha']}, max_len {b['max_len']}), "
        f"validation {b['val_limit']} / test {b['test_limit']} examples a task, grids `{b['grid']}`, "
        f"multitask_full {b['full_steps'] or 0} steps a task, HumanEval {b['humaneval_limit'] or 'all'} problems, "
        f"eval {results['eval_precision']}. Wall time of this run {results['wall_s']:.0f} s "
        f"(trained this run: {', '.join(results['trained_this_run']) or 'nothing'}; "
        f"{results['evaluations_this_run']} evaluations computed, the rest read from records.jsonl). "
        f"{_compute_line(results.get('compute_s'))}", "",
        f"Selection: {results['selection']}. Each cell: test score [95% cluster-bootstrap interval]; "
        "norm = score / the task's expert's; kept = gain kept (score - pretrained) / (expert - pretrained).", "",
        *_experts_table(results), "", "## Rows", "",
        *_main_table(results), *_differences(results), "", *_quality_table(results), *_humaneval_table(results),
        "## Serving every task", "",
        *_table(["way", "bytes"], [[k, _mb(v)] for k, v in results["serving_bytes"].items()]), "",
    ]  # fmt: skip
    if results["skipped"]:
        lines += ["## Rows not run", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    lines += ["## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()), ""]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in PLOTS], ""]
    return "\n".join(lines)

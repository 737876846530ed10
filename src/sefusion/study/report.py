"""results.json -> report.md + PNG plots. Everything in the report is read from the results, never typed in."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}"
    return str(x)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines


def _params(p: Mapping[str, Any] | None) -> str:
    if not p:
        return ""
    parts = []
    for k, v in p.items():
        if isinstance(v, dict):
            v = "{" + ", ".join(f"{t}: {_fmt(x, 2)}" for t, x in v.items()) + "}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def table_text(results: Mapping[str, Any]) -> str:
    """A plain-text table of normalized test scores (what `sefusion study` and `demo` print)."""
    tasks = results["tasks"]
    w = max(12, *(len(t) for t in tasks))
    head = f"{'method':<16}" + "".join(f"{t:>{w + 1}}" for t in tasks) + f"{'avg norm.':>11}{'serve MB':>10}"
    lines = [head, "-" * len(head)]
    for r in results["rows"]:
        test, norm = _point(r, "test"), _point(r, "normalized")
        cells = "".join(f"{_fmt(test[t]):>{w - 6}} ({_fmt(norm[t], 2)})" for t in tasks)
        avg = _point(r, "avg_normalized")
        lines.append(f"{r['method']:<16}{cells}{_fmt(avg):>11}{r['storage_bytes'] / 1e6:>10.1f}")
    over = f", mean over {len(results['seeds'])} training seeds" if results.get("seeds") else ""
    lines.append(f"cells: test score (normalized by the task's own expert){over}")
    return "\n".join(lines)


def _point(row: Mapping[str, Any], part: str) -> Any:
    """A row's test / normalized scores (per task) or avg_normalized: the mean over seeds when it has
    several seeds (where a seed leaves a value undefined: the first seed's), else its own."""
    over = (row.get("over_seeds") or {}).get(part)
    if over is None:
        return row[part]
    if "mean" in over:
        return over["mean"]
    return {t: (s["mean"] if s else row[part][t]) for t, s in over.items()}


def _defined(per_task: Mapping[str, float]) -> dict[str, float]:
    """The tasks whose value is a number (a task whose expert scores 0 has no normalized score)."""
    return {t: v for t, v in per_task.items() if v == v}


def _seeded(row: Mapping[str, Any], part: str, task: str | None = None) -> Any:
    """'mean ± sd' over seeds of a row's `part` (of one task), or None for a one-seed study."""
    from .uncertainty import format_over_seeds

    over = row.get("over_seeds")
    if not over:
        return None
    s = over.get(part) if task is None else (over.get(part) or {}).get(task)
    return "–" if s is None else format_over_seeds(s)


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: one section after another, each read from the results."""
    L = _header(results) + _tasks_section(results) + _test_data_section(results) + _scores_section(results)
    L += _gain_section(results) + _comparisons_section(results) + _data_aware_section(results)
    L += _per_seed_section(results)
    L += _masks_section(results) + _magnitudes_section(results) + _provenance_section(results)
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    L.append("")
    return "\n".join(L)


def _precision_note(results: Mapping[str, Any]) -> str:
    bf16_eval = " (torch autocast; embeddings pooled in float32)"
    bf16_train = " (torch autocast; float32 weights, gradients and AdamW state)"
    return (
        f"scoring in {results.get('eval_precision', 'fp32')}"
        + (bf16_eval if results.get("eval_precision") == "bf16" else "")
        + f"; training in {results.get('train_precision', 'fp32')}"
        + (bf16_train if results.get("train_precision") == "bf16" else "")
    )


def _header(results: Mapping[str, Any]) -> list[str]:
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("timings_s", {}).items())
    return [
        f"# Study: {results['scenario']}",
        "",
        f"{results.get('description', '')}",
        "",
        f"- base: `{results['base']}` (sha256 {results.get('base_sha256', '')[:16]}…)",
        f"- budget: `{results['budget']}`, {_seeds_note(results)}, sefusion {__version__}; "
        + _precision_note(results),
        f"- wall time: {results.get('wall_s', 0):.0f} s (" + timings + ")",
        *_names_note(results),
        *_first_seed_note(results),
        "- hyper-parameters of every fusion row were chosen on the validation split only, then scored once on test;",
        "  normalized score = test score / the task's individual expert's test score.",
        "",
    ]


def _seeds_note(results: Mapping[str, Any]) -> str:
    seeds, data_seed = results.get("seeds"), results.get("data_seed")
    split = "" if data_seed is None else f" (data split seed {data_seed})"
    if not seeds:
        return f"seed {results['seed']}{split}"
    return f"{len(seeds)} training seeds {', '.join(map(str, seeds))}{split}"


def _first_seed_note(results: Mapping[str, Any]) -> list[str]:
    if not results.get("seeds"):
        return []
    return [f"- over seeds: the score tables, gain kept and paired differences; the first seed's ({results['seed']}): "
            "selected hyper-parameters, masks, task-vector magnitudes and the PLeaS curve"]  # fmt: skip


def _names_note(results: Mapping[str, Any]) -> list[str]:
    if "keep_names" not in results:  # results written before the option existed
        return []
    if results["keep_names"]:
        return ["- search queries keep the function's own name (`--keep-names`)"]
    return ["- search queries have the function's own name (and its identifier words) masked"]


def _tasks_section(results: Mapping[str, Any]) -> list[str]:
    tasks, ex = results["tasks"], results["experts"]
    L = ["## Tasks and experts", ""]
    trows = []
    for t in tasks:
        sizes = results["data"][t]["sizes"]
        e, over = ex[t], ex[t].get("over_seeds") or {}
        test = over["test"]["mean"] if over.get("test") else e["test"]
        trows.append(
            [t, e["metric"], e["chance"], _seeded(e, "test") or e["test"], _seeded(e, "validation") or e["validation"],
             sizes.get("train"), sizes.get("validation"), sizes.get("test"), "yes" if test > e["chance"] else "**no**"]
        )  # fmt: skip
    L += _table(
        ["task", "metric", "chance", "expert test", "expert val", "train", "val", "test", "above chance"],
        trows,
    )
    kinds = {t: ex[t]["per_kind"] for t in tasks if ex[t].get("per_kind")}
    if kinds:
        L += ["", "Expert accuracy per kind (test):", ""]
        for t, pk in kinds.items():
            scores = (f"{k} {_fmt(v.get('score') if isinstance(v, dict) else v)}" for k, v in pk.items())
            L.append(f"- {t}: " + ", ".join(scores))
    return L


def _interval(iv: Mapping[str, Any] | None) -> str:
    """'0.812 [0.790, 0.835]'; '–' for a missing interval."""
    from .uncertainty import format_interval

    return "–" if iv is None or iv.get("estimate") is None else format_interval(iv)


def _cell(row: Mapping[str, Any], task: str, value: Any, reading: str) -> Any:
    """A score with its interval when the row has one (results written before intervals: the score)."""
    iv = ((row.get("readings") or {}).get(task) or {}).get(reading)
    return _interval(iv) if iv is not None else value


def _uncertainty_note(results: Mapping[str, Any]) -> list[str]:
    u = results.get("uncertainty")
    if not u:
        return []
    return [f"Brackets: {u['level']:.0%} interval, {u['method']} (B = {u['resamples']}; per-example scores in "
            f"`{u.get('scores_file', 'scores.json')}`).", ""]  # fmt: skip


def _seeds_cells_note(results: Mapping[str, Any]) -> list[str]:
    if not results.get("seeds"):
        return _uncertainty_note(results)
    return [f"Cells: mean ± sd over {len(results['seeds'])} training seeds (each seed's rows selected on its "
            "own validation scores); each seed's scores with their intervals: section *Per seed*.", ""]  # fmt: skip


def _scores_section(results: Mapping[str, Any]) -> list[str]:
    tasks, rows = results["tasks"], results["rows"]

    def cell(r: Mapping[str, Any], t: str, part: str, reading: str) -> Any:
        return _seeded(r, part, t) or _cell(r, t, r[part][t], reading)

    L = ["", "## Absolute test scores", "", *_seeds_cells_note(results)]
    L += _table(["method", *tasks, "average"],
                [[r["method"], *(cell(r, t, "test", "interval") for t in tasks),
                  sum(_point(r, "test").values()) / len(tasks)] for r in rows])  # fmt: skip
    L += ["", "## Normalized test scores (fused / individual expert)", ""]
    L += _table(
        ["method", *tasks, "avg normalized", "bytes to serve all tasks"],
        [[r["method"], *(cell(r, t, "normalized", "normalized") for t in tasks),
          _seeded(r, "avg_normalized") or r["avg_normalized"], _mb(r["storage_bytes"])] for r in rows],
    )  # fmt: skip
    L += ["", "## Selected hyper-parameters (on validation)", ""]
    if results.get("seeds"):
        L += [f"Those of training seed {results['seeds'][0]}; every seed's in section *Per seed*.", ""]
    L += _table(
        ["method", "params", "candidates"],
        [[r["method"], _params(r["params"]) or "–", len(r.get("grid") or []) or "–"] for r in rows],
    )
    return L


def _test_data_section(results: Mapping[str, Any]) -> list[str]:
    """Each task's data fingerprint, test examples and source files, and its no-training baseline."""
    data = results.get("data") or {}
    tasks = [t for t in results["tasks"] if "fingerprint" in (data.get(t) or {})]
    if not tasks:
        return []
    rows = []
    for t in tasks:
        d, base = data[t], data[t].get("baseline")
        rows.append([t, f"`{str(d['fingerprint'])[:16]}`", d.get("test_examples"), d.get("test_files"),
                     base["name"] if base else "–", _interval(base)])  # fmt: skip
    return ["", "## Test data and no-training baselines", "",
            "Fingerprint: sha256 of the task's splits (first 16 hex digits). Baseline: what the test split gives "
            "away with no model (name match + TF-IDF for search, the train split's majority class otherwise).",
            "", *_table(["task", "fingerprint", "test examples", "test files", "baseline", "baseline score"], rows)]  # fmt: skip


def _gain_section(results: Mapping[str, Any]) -> list[str]:
    """Gain kept (fused - pretrained) / (expert - pretrained) per row and task, with the failure flags."""
    from . import gains

    tasks, points = results["tasks"], gains.row_readings(results)
    if not points:
        return []
    rows = []
    for r in results["rows"]:
        if r["method"] not in points:
            continue
        cells = []
        for t in tasks:
            if r.get("over_seeds"):
                cells.append(_seeded_gain(r, t, len(results["seeds"])))
                continue
            p = points[r["method"]].get(t) or {}
            reading = (r.get("readings") or {}).get(t) or {}
            g = _interval(reading["gain_kept"]) if reading.get("gain_kept") else _fmt(p.get("gain_kept"))
            marks = [f + ("*" if f == gains.BELOW_PRETRAINED and reading.get("below_pretrained_significant")
                          else "") for f in reading.get("flags", p.get("flags") or [])]  # fmt: skip
            cells.append(g + (f" ({', '.join(marks)})" if marks else ""))
        rows.append([r["method"], *cells])
    seeded = ("Cells: mean ± sd over seeds; a flag with the number of seeds that raise it. "
              if results.get("seeds") else "")  # fmt: skip
    return ["", "## Gain kept ((fused − pretrained) / (expert − pretrained))", "", seeded +
            "1: the fused row keeps all the expert's gain over the `pretrained` row; 0: none; < 0: worse than not "
            "fine-tuning (– : the expert does not beat `pretrained`). Flags: below the `pretrained` row's score "
            "(* significantly: the paired interval excludes 0), below chance.",
            "", *_table(["method", *tasks], rows)]  # fmt: skip


def _seeded_gain(row: Mapping[str, Any], task: str, n: int) -> str:
    """'0.61 ± 0.05 (below pretrained 1/3)': the gain kept over seeds, each flag with its seed count."""
    flags = (row["over_seeds"].get("flags") or {}).get(task) or {}
    marks = [f"{f} {k}/{n}" for f, k in flags.items()]
    return _seeded(row, "gain_kept", task) + (f" ({', '.join(marks)})" if marks else "")


def _comparisons_section(results: Mapping[str, Any]) -> list[str]:
    """The paired differences of test scores the study compares, * where the interval excludes 0."""
    if results.get("comparisons_over_seeds"):
        return _seeded_comparisons(results)
    comp, tasks = results.get("comparisons") or {}, results["tasks"]
    pairs: list[str] = []
    for t in tasks:
        pairs += [p for p in comp.get(t) or {} if p not in pairs]
    if not pairs:
        return []

    def cell(t: str, p: str) -> str:
        d = (comp.get(t) or {}).get(p)
        return "–" if d is None else _interval(d) + (" *" if d.get("significant") else "")

    return ["", "## Paired differences of test scores", "",
            "Each difference a − b on the same bootstrap resamples of the task's test examples; "
            "* significant: its interval excludes 0.",
            "", *_table(["a − b", *tasks], [[p, *(cell(t, p) for t in tasks)] for p in pairs])]  # fmt: skip


def _seeded_comparisons(results: Mapping[str, Any]) -> list[str]:
    """The paired differences over seeds: mean ± sd, and in how many seeds each is significant."""
    from .uncertainty import format_over_seeds

    comp, tasks, n = results["comparisons_over_seeds"], results["tasks"], len(results["seeds"])
    pairs: list[str] = []
    for t in tasks:
        pairs += [p for p in comp.get(t) or {} if p not in pairs]

    def cell(t: str, p: str) -> str:
        d = (comp.get(t) or {}).get(p)
        if d is None:
            return "–"
        sig = [f"{w} {d[f'significant_{w}']}/{n}" for w in ("below", "above") if d[f"significant_{w}"]]
        return format_over_seeds(d) + (f" (significant {', '.join(sig)})" if sig else "")

    return ["", "## Paired differences of test scores", "",
            f"Each difference a − b: mean ± sd over {n} seeds; significant below / above 0: in how many seeds "
            "the paired interval (same bootstrap resamples of the task's test examples) excludes 0.",
            "", *_table(["a − b", *tasks], [[p, *(cell(t, p) for t in tasks)] for p in pairs])]  # fmt: skip


def _per_seed_section(results: Mapping[str, Any]) -> list[str]:
    """Each seed's selected params and normalized test scores with their bootstrap intervals."""
    per_seed, tasks = results.get("per_seed") or [], results["tasks"]
    if not per_seed:
        return []
    L = ["", "## Per seed", "", *_uncertainty_note(results)]
    for entry in per_seed:
        L += ["", f"### Training seed {entry['seed']} (scores: `{entry.get('scores_file', '–')}`)", ""]
        L += _table(["method", "params", *(f"{t} normalized" for t in tasks), "avg normalized"],
                    [[r["method"], _params(r.get("params")) or "–",
                      *(_cell(r, t, r["normalized"][t], "normalized") for t in tasks), r["avg_normalized"]]
                     for r in entry["rows"]])  # fmt: skip
    return L


def _data_aware_section(results: Mapping[str, Any]) -> list[str]:
    L: list[str] = []
    st = results.get("statistics") or {}
    if st.get("methods"):
        L += ["", "## Data-aware methods", ""]
        L.append(
            f"{', '.join(st['methods'])}: each expert's statistics come from {st.get('examples')} examples of its "
            f"own task's {st.get('split', 'train')} split (the data budget; never validation or test). Fisher: "
            f"{st.get('fisher', 'diagonal')}. RegMean: Gram matrices X^T X of every linear layer's inputs over "
            "the same examples' tokens. PLeaS: both models' features on the same examples, half from each task."
        )
    for method, why in (results.get("skipped") or {}).items():
        L.append(f"\n- `{method}` not run: {why}.")
    return L + _curve_section(results)


def _curve_section(results: Mapping[str, Any]) -> list[str]:
    tasks, curve = results["tasks"], results.get("pleas_budgets") or []
    if not curve:
        return []
    return [
        "", "### PLeaS: merged size against score (budget)", "",
        "Budget b merges the best-matched share b of each FFN's units and keeps the rest of *both* models "
        "side by side (a wider FFN); residual stream and heads are always merged. Every budget is scored "
        "on validation and test; none is selected.",
        "",
        *_table(
            ["budget", *tasks, "avg norm.", "bytes", "size vs b=1"],
            [[c["budget"], *(c["normalized"][t] for t in tasks), c["avg_normalized"], _mb(c["storage_bytes"]),
              c["size_vs_budget_1"]] for c in curve],
        ),
    ]  # fmt: skip


def _masks_section(results: Mapping[str, Any]) -> list[str]:
    by = {r["method"]: r for r in results["rows"]}
    if "tall_masks" not in by or "scaling_masks" not in by:
        return []
    masks, tall, sc = results.get("masks", {}), by["tall_masks"], by["scaling_masks"]
    rows = [
        [t, tall["normalized"][t], sc["normalized"][t], sc["normalized"][t] - tall["normalized"][t],
         masks.get("tall_masks", {}).get("mask_density", {}).get(t),
         masks.get("scaling_masks", {}).get("mask_density", {}).get(t),
         masks.get("scaling_masks", {}).get("mean_scale", {}).get(t),
         results["magnitudes"]["tasks"][t]["relative"]]
        for t in results["tasks"]
    ]  # fmt: skip
    header = ["task", "TALL norm.", "Scaling norm.", "Δ", "TALL mask share", "Scaling mask share",
              "mean scale s_t", "‖τ_t‖/‖θ0‖"]  # fmt: skip
    return ["", "## Scaling-Masks vs TALL-Masks per task", "", *_table(header, rows)]


def _magnitudes_section(results: Mapping[str, Any]) -> list[str]:
    tasks, mags = results["tasks"], results["magnitudes"]
    L = ["", "## Task-vector magnitude per layer (‖τ_t‖ / ‖θ0‖ of the layer)", ""]
    L += _table(
        ["task", *mags["layers"], "whole body"],
        [[t, *(mags["tasks"][t]["per_layer"][g]["relative"] for g in mags["layers"]), mags["tasks"][t]["relative"]]
         for t in tasks],
    )  # fmt: skip
    return L


def _provenance_section(results: Mapping[str, Any]) -> list[str]:
    L = ["", "## Corpus provenance", ""]
    seen = set()
    for t in results["tasks"]:
        prov = results["data"][t].get("provenance") or {}
        text = json.dumps(prov, sort_keys=True)
        if text in seen:
            continue
        seen.add(text)
        L.append(f"- {t}: " + _provenance_line(prov))
    return L


def _provenance_line(prov: Mapping[str, Any]) -> str:
    sources = prov.get("sources")
    if isinstance(sources, list) and sources:
        parts = []
        for s in sources:
            if isinstance(s, dict):
                parts.append(
                    " ".join(str(s[k]) for k in ("name", "package", "version") if s.get(k))
                    + (f" [{s['licence']}]" if s.get("licence") else "")
                )
            else:
                parts.append(str(s))
        return "; ".join(parts)
    return json.dumps(prov, sort_keys=True)[:400]


def plot(results: Mapping[str, Any], out: Path) -> list[str]:
    """normalized.png (score per task per method) and magnitudes.png (‖τ_t‖/‖θ0‖ per layer)."""
    return [plot_normalized(results, out), _plot_magnitudes(results, out)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_normalized(results: Mapping[str, Any], out: Path) -> str:
    """normalized.png: each row's test score per task over the task's expert's (± sd over seeds)."""
    plt = _pyplot()
    tasks, rows = results["tasks"], results["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows) + 2), 4.5))
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(rows))]
        sds = [(((r.get("over_seeds") or {}).get("normalized") or {}).get(t) or {}).get("sd") for r in rows]
        yerr = [sd or 0.0 for sd in sds] if any(sd is not None for sd in sds) else None  # ± sd over seeds
        ys = [_point(r, "normalized")[t] for r in rows]
        ax.bar(xs, [math.nan if y is None else y for y in ys], width, yerr=yerr, capsize=2, label=t)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("normalized test score")
    ax.set_title(f"{results['scenario']}: score / individual expert ({results['budget']} budget)")
    # beside the axes: inside, it covers the bars of whichever methods sit under it
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "normalized.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "normalized.png"


def _plot_magnitudes(results: Mapping[str, Any], out: Path) -> str:
    plt = _pyplot()
    tasks, mags = results["tasks"], results["magnitudes"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in tasks:
        ax.plot(
            mags["layers"],
            [mags["tasks"][t]["per_layer"][g]["relative"] for g in mags["layers"]],
            marker="o",
            label=t,
        )
    ax.set_yscale("log")
    ax.set_ylabel("‖τ_t‖ / ‖θ0‖ per layer")
    ax.set_title(f"{results['scenario']}: task-vector magnitude per layer")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out / "magnitudes.png", dpi=110)
    plt.close(fig)
    return "magnitudes.png"


DEGRADED = 0.9  # a task "degrades" under fusion when it keeps less than this share of its expert's score


def summary_markdown(runs: Sequence[Mapping[str, Any]]) -> str:
    """Several scenarios side by side: per method, the average normalized test score and the worst task's
    normalized score in each scenario; how many tasks each method degrades (normalized < DEGRADED);
    TALL-Masks against Scaling-Masks on each scenario's weakest task vector; each scenario's experts
    against chance. Read from the results, as the reports are."""
    methods: list[str] = []
    for res in runs:
        for r in res["rows"]:
            if r["method"] not in methods:
                methods.append(r["method"])
    names = [str(res["scenario"]) for res in runs]
    header = ["method", *(f"{n}: avg" for n in names), *(f"{n}: worst task" for n in names)]
    rows = []
    for m in methods:
        by = [next((r for r in res["rows"] if r["method"] == m), None) for res in runs]
        rows.append([m, *(_summary_avg(r) for r in by), *(_summary_worst(r) for r in by)])
    L = ["Normalized test score (fused / the task's own expert), averaged over the scenario's tasks, and",
         "that of its worst task (– : not run in that scenario; mean ± sd where a scenario ran several seeds).",
         ""]  # fmt: skip
    L += _table(header, rows)
    L += [
        "",
        f"Tasks that keep less than {DEGRADED:.0%} of their expert's test score (degraded / tasks):",
        "",
    ]
    deg_rows = []
    for m in methods:
        cells = []
        for res in runs:
            r = next((r for r in res["rows"] if r["method"] == m), None)
            vals = list(_defined(_point(r, "normalized")).values()) if r and r["normalized"] else []
            cells.append(f"{sum(v < DEGRADED for v in vals)}/{len(vals)}" if vals else None)
        deg_rows.append([m, *cells])
    L += _table(["method", *names], deg_rows)
    weak_rows = []
    for res in runs:
        by = {r["method"]: r for r in res["rows"]}
        mags = (res.get("magnitudes") or {}).get("tasks") or {}
        if "tall_masks" not in by or "scaling_masks" not in by or not mags:
            continue
        order = sorted(mags, key=lambda t: mags[t]["relative"])
        weakest, strongest = order[0], order[-1]
        for t, which in ((weakest, "weakest"), (strongest, "strongest")):
            weak_rows.append([res["scenario"], f"{t} ({which})", mags[t]["relative"],
                              _point(by["tall_masks"], "normalized")[t], _point(by["scaling_masks"], "normalized")[t]])  # fmt: skip
    if weak_rows:
        L += ["", "TALL-Masks and Scaling-Masks on each scenario's weakest and strongest task vector "
                  "(‖τ_t‖/‖θ0‖ of the body; normalized test scores):", ""]  # fmt: skip
        L += _table(["scenario", "task", "‖τ_t‖/‖θ0‖", "tall_masks", "scaling_masks"], weak_rows)
    from .gains import summary_lines as gain_lines  # numpy: imported only when a summary is written

    L += ["", *gain_lines(runs)]
    L += _significance_lines(runs, methods)
    seeded = [str(res["scenario"]) for res in runs if res.get("seeds")]
    if seeded:
        L += ["", f"Several training seeds ({', '.join(seeded)}): gain kept and significance above are the first "
              "seed's; each report's own tables give them over seeds."]  # fmt: skip
    L += ["", "Experts (test score, chance level):", ""]
    for res in runs:
        cells = ", ".join(
            f"{t} {_fmt(e['test'])} (chance {_fmt(e.get('chance'))})" for t, e in res["experts"].items()
        )
        L.append(f"- {res['scenario']} ({res.get('budget', '?')} budget): {cells}")
    return "\n".join(L) + "\n"


def _summary_avg(row: Mapping[str, Any] | None) -> Any:
    return None if row is None else _seeded(row, "avg_normalized") or row["avg_normalized"]


def _summary_worst(row: Mapping[str, Any] | None) -> Any:
    """The normalized score of the row's worst task (by its mean over seeds, where it has seeds)."""
    norm = _defined(_point(row, "normalized")) if row is not None else {}
    if not norm:
        return None
    worst = min(norm, key=norm.__getitem__)
    return _seeded(row, "normalized", worst) or norm[worst]


def _significance_lines(runs: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[str]:
    """Per method and scenario: the tasks where the row is significantly below / above the individual
    experts (paired interval of the difference excludes 0); results without intervals: '–'."""
    if not any(res.get("comparisons") for res in runs):
        return []
    rows = []
    for m in methods:
        cells: list[Any] = []
        for res in runs:
            comp = res.get("comparisons") or {}
            diffs = [(comp.get(t) or {}).get(f"{m} - individual") for t in res["tasks"]]
            diffs = [d for d in diffs if d is not None]
            below = sum(d["significant"] and d["estimate"] < 0 for d in diffs)
            above = sum(d["significant"] and d["estimate"] > 0 for d in diffs)
            cells.append(f"{below} below, {above} above / {len(diffs)}" if diffs else None)
        if any(c is not None for c in cells):
            rows.append([m, *cells])
    names = [str(res["scenario"]) for res in runs]
    return ["", "Tasks where the row differs significantly from the individual experts (the paired 95% interval "
            "of the test-score difference excludes 0):", "", *_table(["method", *names], rows)]  # fmt: skip


def read_results(folder: str | Path) -> dict[str, Any]:
    """The results.json of a report folder (or the file itself)."""
    p = Path(folder)
    p = p / "results.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except OSError as exc:
        from ..errors import SefusionError

        raise SefusionError(f"cannot read {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        from ..errors import SefusionError

        raise SefusionError(f"{p} is not valid JSON: {exc.msg} (line {exc.lineno})") from None


def write_report(results: Mapping[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    files = plot(results, out)
    (out / "report.md").write_text(render_markdown(results, files))

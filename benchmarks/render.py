"""Render BENCHMARKS.md from a results JSON written by benchmarks/run.py.

    python benchmarks/render.py [RESULTS.json] [-o BENCHMARKS.md]

Pure and deterministic: the markdown is a function of the JSON alone (medians and targets are recomputed
from the raw samples). Without RESULTS.json the newest full (non-quick) run under benchmarks/results/ is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
SEFUSION_ONLY = ("tall_masks", "scaling_masks", "consensus")
METHODS = MERGEKIT_METHODS + SEFUSION_ONLY


# ---------------------------------------------------------------- numbers


def summarize(samples: list[dict]) -> dict:
    """Median wall time and peak RSS over the successful samples (rc 0)."""
    ok = [s for s in samples if s.get("rc") == 0]
    cpu = [s for s in ok if s.get("user_s") is not None and s.get("sys_s") is not None and s["wall_s"] > 0]
    return {
        "n": len(ok),
        "failures": len(samples) - len(ok),
        "median_s": statistics.median(s["wall_s"] for s in ok) if ok else None,
        "median_rss_bytes": int(statistics.median(s["maxrss_bytes"] for s in ok)) if ok else None,
        # cores kept busy on average ((user + sys) CPU time / wall time) and the kernel's share of it
        "median_cores": statistics.median((s["user_s"] + s["sys_s"]) / s["wall_s"] for s in cpu)
        if cpu
        else None,
        "median_sys_share": statistics.median(s["sys_s"] / max(s["user_s"] + s["sys_s"], 1e-9) for s in cpu)
        if cpu
        else None,
    }


def _tool(entry: dict | None) -> dict | None:
    return summarize(entry["samples"]) if entry and entry.get("samples") is not None else None


def method_row(entry: dict) -> dict:
    """One method of one group: both tools' medians, speed-up (mergekit / sefusion time), memory ratio (sefusion / mergekit)."""
    sef, mk = _tool(entry.get("sefusion")), _tool(entry.get("mergekit"))
    row = {"sefusion": sef, "mergekit": mk, "speedup": None, "memory_ratio": None}
    if sef and mk and sef["median_s"] and mk["median_s"]:
        row["speedup"] = mk["median_s"] / sef["median_s"]
    if sef and mk and sef["median_rss_bytes"] and mk["median_rss_bytes"]:
        row["memory_ratio"] = sef["median_rss_bytes"] / mk["median_rss_bytes"]
    return row


def agreement_text(ag: dict | None) -> str:
    """One line for an output comparison written by benchmarks/compare.py (via run.py)."""
    if not ag:
        return "not compared"
    if ag.get("error"):
        return f"comparison failed: {ag['error'][:200]}"
    ab = ag["a_vs_b"]
    text = (
        f"max {ab['max_steps']} bf16 steps apart, {100 * ab['share_differ']:.2f}% of elements differ, "
        f"{100 * ab['share_over_one_step']:.2f}% by more than one step"
    )
    if ab.get("rel_l2_vs_change") is not None:
        text += f", ‖a−b‖/‖a−θ0‖ = {ab['rel_l2_vs_change']:.3f}"
    ref = ag.get("reference")
    if ref:
        parts = []
        for who, r in (("sefusion", ref["a"]), ("mergekit", ref["b"])):
            p = f"{who} max {r['max_steps']} step(s)"
            if r["max_steps"] > 1:
                p += (
                    f" ({100 * r['share_over_one_step']:.3f}% of elements over one step, "
                    f"max |error| {r.get('max_abs_diff', 0):.1e})"
                )
            parts.append(p)
        text += "; vs float64 reference: " + ", ".join(parts)
    return text


def agreement_ok(ag: dict | None) -> bool | None:
    """Does a comparison meet its expectation? None where nothing is expected elementwise."""
    if not ag:
        return None
    if ag.get("error"):
        return False
    ref = ag.get("reference") or {}
    sef_exact = bool(ref.get("a", {}).get("within_one_step"))
    if ag.get("expect") == "equal":
        return bool(sef_exact and ref.get("b", {}).get("within_one_step") and ag["a_vs_b"]["within_one_step"])
    if ag.get("expect") == "exact":
        return sef_exact
    return None


def _label(group: dict) -> str:
    return f"{group['size']}, {group['experts']} experts"


def _ordered_groups(data: dict) -> list[dict]:
    return sorted(data["groups"], key=lambda g: (g["params"], g["experts"]))


def _verdict(checks: list[tuple[bool, str]]) -> tuple[str, str]:
    if not checks:
        return "n/a", "not measured in this run"
    failed = [d for ok, d in checks if not ok]
    return ("FAIL" if failed else "PASS"), "; ".join(d for _, d in checks)


def targets(data: dict) -> list[dict]:
    """The issue's targets, each PASS / FAIL / n/a with the numbers behind it (every group that has them)."""
    groups = _ordered_groups(data)
    rows = {
        g["size"] + "/" + str(g["experts"]): {m: method_row(e) for m, e in g["methods"].items()}
        for g in groups
    }

    def key(g: dict) -> str:
        return g["size"] + "/" + str(g["experts"])

    out = []

    def ratio_target(
        name: str, methods: tuple[str, ...], field: str, bound: float, fmt: str, above: bool
    ) -> None:
        checks = []
        for g in groups:
            for m in methods:
                r = rows[key(g)].get(m)
                if r is None or r[field] is None:
                    continue
                v = r[field]
                ok = v >= bound if above else v <= bound
                checks.append((ok, f"{m} {_label(g)}: {fmt.format(v)}"))
        status, detail = _verdict(checks)
        out.append({"target": name, "status": status, "detail": detail})

    ratio_target("ties ≥10x faster than mergekit", ("ties",), "speedup", 10.0, "{:.1f}x", True)
    ratio_target(
        "ties peak memory ≤ 1/3 of mergekit's",
        ("ties",),
        "memory_ratio",
        1 / 3,
        "{:.2f} of mergekit's",
        False,
    )
    ratio_target(
        "linear and task_arithmetic ≥3x faster than mergekit",
        ("linear", "task_arithmetic"),
        "speedup",
        3.0,
        "{:.1f}x",
        True,
    )

    checks = []
    for g in groups:
        ties = (rows[key(g)].get("ties") or {}).get("sefusion")
        for m in ("tall_masks", "scaling_masks"):
            own = (rows[key(g)].get(m) or {}).get("sefusion")
            if ties and own and ties["median_s"] and own["median_s"]:
                v = own["median_s"] / ties["median_s"]
                checks.append((v <= 2.0, f"{m} {_label(g)}: {v:.2f}x ties"))
    status, detail = _verdict(checks)
    out.append(
        {"target": "tall_masks / scaling_masks ≤ 2x sefusion's ties time", "status": status, "detail": detail}
    )

    # Memory follows the largest tensor, not the model: from the smallest to the largest size, peak RSS may
    # grow by at most (largest tensor's bytes, as stored) x (number of models read: base + experts).
    checks = []
    sizes = sorted({(g["params"], g["size"]) for g in groups})
    if len(sizes) >= 2:
        small, large = sizes[0][1], sizes[-1][1]
        by = {(g["size"], g["experts"]): g for g in groups}
        for n in sorted({g["experts"] for g in groups}):
            gs, gl = by.get((small, n)), by.get((large, n))
            if not gs or not gl:
                continue
            allowance = (gl["largest_tensor_bytes"] - gs["largest_tensor_bytes"]) * (n + 1)
            for m in METHODS:
                a = (rows[key(gs)].get(m) or {}).get("sefusion")
                b = (rows[key(gl)].get(m) or {}).get("sefusion")
                if not a or not b or a["median_rss_bytes"] is None or b["median_rss_bytes"] is None:
                    continue
                grow = b["median_rss_bytes"] - a["median_rss_bytes"]
                checks.append(
                    (
                        grow <= allowance,
                        f"{m} {n} experts: +{_mb(grow)} (allowed +{_mb(allowance)})",
                    )
                )
    status, detail = _verdict(checks)
    out.append(
        {
            "target": "sefusion peak memory at the largest size ≤ smallest size's + Δ(largest tensor) × models",
            "status": status,
            "detail": detail,
        }
    )

    # Exactness, as far as a benchmark can check it: the closed-form methods against a float64 reference
    # (tests/test_engine_precision.py holds every method to the same bar, and to the in-memory path).
    checks = []
    for g in groups:
        for m in ("linear", "task_arithmetic"):
            ag = (g["methods"].get(m) or {}).get("agreement")
            if not ag:
                continue
            if ag.get("error"):
                checks.append((False, f"{m} {_label(g)}: comparison failed"))
                continue
            ref = ag.get("reference") or {}
            sef, mk = ref.get("a", {}), ref.get("b", {})
            checks.append(
                (
                    bool(sef.get("within_one_step")),
                    f"{m} {_label(g)}: sefusion max {sef.get('max_steps', '?')} step(s) from float64 "
                    f"(mergekit max {mk.get('max_steps', '?')})",
                )
            )
    status, detail = _verdict(checks)
    out.append(
        {
            "target": "sefusion outputs within one bf16 step of a float64 reference (linear, task_arithmetic)",
            "status": status,
            "detail": detail,
        }
    )
    return out


# ---------------------------------------------------------------- formatting


def _mb(n: float | None) -> str:
    if n is None:
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n / 1e9:.2f} GB" if n >= 1e9 else f"{sign}{n / 1e6:.0f} MB"


def _s(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _x(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}x"


def _cell_s(t: dict | None, missing: str = "–") -> str:
    if t is None:
        return missing
    if t["n"] == 0 and t["failures"] == 0:
        return "not run"
    s = _s(t["median_s"])
    return s + (f" ({t['failures']} failed)" if t["failures"] else "")


def _cpu(t: dict | None) -> str:
    if not t or t.get("median_cores") is None:
        return "–"
    return f"{t['median_cores']:.2f} ({100 * t['median_sys_share']:.0f}% sys)"


def group_table(group: dict) -> list[str]:
    floor = summarize(group["floor"]["samples"]) if group.get("floor") else None
    floor_s = floor and floor["median_s"]
    lines = [
        "| method | sefusion s | mergekit s | speed-up | sefusion RSS | mergekit RSS | memory ratio "
        "| sefusion cores | mergekit cores | sefusion / I/O floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in [m for m in METHODS if m in group["methods"]] + sorted(set(group["methods"]) - set(METHODS)):
        r = method_row(group["methods"][m])
        sef, mk = r["sefusion"], r["mergekit"]
        mk_missing = "not run" if m in MERGEKIT_METHODS else "–"
        ratio = "–" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        lines.append(
            f"| {m} | {_cell_s(sef)} | {_cell_s(mk, mk_missing)} | {_x(r['speedup'])} "
            f"| {_mb(sef and sef['median_rss_bytes'])} | {_mb(mk and mk['median_rss_bytes'])} "
            f"| {ratio} | {_cpu(sef)} | {_cpu(mk)} "
            f"| {_x(sef['median_s'] / floor_s, 0) if sef and sef['median_s'] and floor_s else '–'} |"
        )
    return lines


def _load_text(data: dict) -> str:
    loads = [
        s["load1_before"]
        for g in data["groups"]
        for e in g["methods"].values()
        for tool in ("sefusion", "mergekit")
        if e.get(tool)
        for s in e[tool]["samples"]
        if s.get("load1_before") is not None
    ]
    if not loads:
        return ""
    return (
        f" The 1-minute load average as runs started: median {statistics.median(loads):.1f}, "
        f"range {min(loads):.1f}–{max(loads):.1f}."
    )


def _supplement(data: dict, source: str) -> list[str]:
    """A later run that fills gaps of the main one: its tables only (the targets stay the main run's)."""
    out = [
        f"## Supplementary run of {data['created']} (`{source}`)",
        "",
        f"Made with `{data.get('command', '?')}` on the same machine, to fill cells the main run did not reach. "
        "Its numbers are shown here and do not enter the targets above.",
        "",
    ]
    for g in _ordered_groups(data):
        out += [f"### {g['size']} ({g['params'] / 1e6:.0f}M parameters), base + {g['experts']} experts", ""]
        out += group_table(g)
        out.append("")
    return out


def render(
    data: dict,
    source: str = "",
    supplements: list[tuple[str, dict]] = (),
    notes: str = "",
    notes_source: str = "",
) -> str:
    machine, versions, settings = data["machine"], data["versions"], data["settings"]
    out = [
        "# Benchmarks: sefusion vs mergekit 0.1.5",
        "",
        "<!-- Generated by benchmarks/render.py from the results JSON; edit the renderer, not this file. -->",
        "",
        f"Run of {data['created']}" + (f", results in `{source}`" if source else "") + ". "
        "Synthetic Llama-shaped checkpoints (`benchmarks/checkpoints.py`: base ~ N(0, 0.02), each expert = "
        "base + N(0, 1e-3), bfloat16, sharded safetensors). Both tools read the same folders and write a "
        "bfloat16 model; they run alternately (sefusion, mergekit, sefusion, ...), each as a child process "
        "whose wall time and peak RSS (`ru_maxrss` from `wait4`) are measured; the tables give medians. "
        "Speed-up = mergekit time / sefusion time; memory ratio = sefusion RSS / mergekit RSS. "
        "The I/O floor reads every input byte and writes a base-sized output with no computation.",
        "",
    ]
    if data.get("quick"):
        out += ["**Quick smoke run** (small model, one repeat): not a benchmark result.", ""]
    if "total_s" not in data:
        missing = [
            f"{m} ({_label(g)})"
            for g in _ordered_groups(data)
            for m, e in g["methods"].items()
            if any(e.get(t) is not None and not e[t]["samples"] for t in ("sefusion", "mergekit"))
        ]
        done = {(g["size"], g["experts"], m) for g in data["groups"] for m, e in g["methods"].items()}
        missing += [
            f"{m} ({p['size']}, {p['experts']} experts)"
            for p in data.get("plan", [])
            for m in p["methods"]
            if (p["size"], p["experts"], m) not in done
        ]
        out += [
            "**This run did not finish**: the harness stopped before the end of its plan, so the cells "
            "marked *not run* have no sample"
            + (f" ({', '.join(missing)})" if missing else "")
            + "; every number shown is from a completed run.",
            "",
        ]
    out += ["## Targets", "", "| target | result | numbers |", "| --- | --- | --- |"]
    out += [f"| {t['target']} | **{t['status']}** | {t['detail']} |" for t in targets(data)]
    out.append("")

    for g in _ordered_groups(data):
        out += [f"## {g['size']} ({g['params'] / 1e6:.0f}M parameters), base + {g['experts']} experts", ""]
        if g.get("inputs_fit_in_ram"):
            fit = f"they fit in RAM ({_mb(machine['ram_bytes'])}) and were read once before every run"
        else:
            fit = (
                f"they **do not fit** in the page cache beside a merge (RAM {_mb(machine['ram_bytes'])}), "
                "so every run reads them from disk and no run pre-reads them"
            )
        reps = g.get("repeats_by_tool") or {"sefusion": g["repeats"], "mergekit": g["repeats"]}
        if len(set(reps.values())) == 1:
            rep_text = f"{g['repeats']} repeat(s) per tool and method (medians)."
        else:
            rep_text = (
                "Repeats per method: "
                + ", ".join(f"{t} {r}" for t, r in reps.items())
                + " (medians; fewer mergekit runs to keep the whole run near an hour)."
            )
        floor = summarize(g["floor"]["samples"]) if g.get("floor") else None
        out += [
            f"Inputs {_mb(g['inputs_bytes'])} ({g['experts'] + 1} models × {_mb(g['model_bytes'])}, "
            f"{g.get('shards', '?')} shards each; largest tensor {_mb(g['largest_tensor_bytes'])}); {fit}. "
            + rep_text,
            "",
        ]
        if floor and floor["median_s"] is not None:
            read_gbps = g["inputs_bytes"] / floor["median_s"] / 1e9
            out += [
                f"I/O floor: {_s(floor['median_s'])} s to read the {_mb(g['inputs_bytes'])} of inputs and write "
                f"a {_mb(g['model_bytes'])} output with no computation ({read_gbps:.1f} GB/s overall), "
                f"peak RSS {_mb(floor['median_rss_bytes'])}.",
                "",
            ]
        out += group_table(g)
        out.append("")
        compared = [(m, e.get("agreement")) for m, e in g["methods"].items() if e.get("agreement")]
        if compared:
            out += ["Outputs of the first run of each tool, compared (a = sefusion, b = mergekit):", ""]
            for m, ag in compared:
                ok = agreement_ok(ag)
                verdict = {True: "as expected", False: "**NOT as expected**", None: "reported only"}[ok]
                out.append(f"- {m} ({ag.get('expect', '?')}: {verdict}): {agreement_text(ag)}.")
            out.append("")

    for sup_source, sup in supplements:
        out += _supplement(sup, sup_source)
    if notes.strip():
        out += [f"## Engineering notes (`{notes_source}`: single-process measurements, not side by side)", ""]
        out += [notes.strip(), ""]

    expectations = {}
    for g in data["groups"]:
        for m, e in g["methods"].items():
            if e.get("agreement") and e["agreement"].get("why"):
                expectations[m] = e["agreement"]["why"]
    if expectations:
        out += ["## Do the outputs agree?", ""]
        out += [
            "After the first run of each tool the harness compares the two outputs tensor by tensor "
            "(`benchmarks/compare.py`), counting distances in bfloat16 steps (0: the same bits, 1: neighbours); "
            "for the methods with a closed form it also evaluates the formula in float64 from the inputs. "
            "What each comparison expects:",
            "",
        ]
        out += [f"- {m}: {why}." for m, why in expectations.items()]
        out.append("")

    out += [
        "## Conditions",
        "",
        "The machine is shared: other people ran unit tests and their own measurements on it during the run, "
        "so some samples carry their load (a 2-core machine with a load average above 2 gives each process "
        "less than a core). That is why the two tools run alternately (each method's runs interleave sefusion "
        "and mergekit, so both see the same background) and why the tables give medians; a single-run cell "
        "carries whatever load there was. Every run is a fresh process: its time includes Python and torch "
        "start-up (about 2 s for either tool here). *cores* = (user + system CPU time) / wall time of the run; "
        "*sys* is the kernel's share of that CPU time (page faults, reads, writes)." + _load_text(data),
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu_model', '?')}, {machine['cpu_count']} cores; RAM {_mb(machine['ram_bytes'])}",
        f"- OS: {machine.get('os', '?')}; Python {machine.get('python', '?')}",
        f"- sefusion {versions.get('sefusion', '?')} (git {versions.get('git_commit', '?')}"
        + (", with uncommitted changes" if versions.get("git_dirty") else "")
        + f"), torch {versions.get('sefusion_torch', '?')}",
        f"- mergekit {versions.get('mergekit', '?')}, torch {versions.get('mergekit_torch', '?')}, "
        f"transformers {versions.get('mergekit_transformers', '?')} (own virtual environment)",
        "",
        "## How each tool was run",
        "",
        "```bash",
        settings["sefusion_cmd"],
        settings["mergekit_cmd"],
        settings["floor_cmd"],
        "```",
        "",
        f"Environment of both: `{' '.join(f'{k}={v}' for k, v in sorted(settings.get('env', {}).items()))}`. "
        + settings.get("mergekit_flags_why", ""),
        "",
        "| method | sefusion recipe | mergekit config |",
        "| --- | --- | --- |",
    ]
    for m, r in settings["recipes"].items():
        mk = "–" if r.get("mergekit") is None else f"`{json.dumps(r['mergekit'], sort_keys=True)}`"
        out.append(f"| {m} | `{json.dumps(r['sefusion'], sort_keys=True)}` | {mk} |")
    out += [
        "",
        "Peak RSS counts file-backed pages a process has mapped and touched as well as its own memory "
        "(mergekit reads safetensors through memory maps; a tool that reads with plain reads does not "
        "count the page cache).",
        "",
        "## Reproduce",
        "",
        "```bash",
        "make setup                                   # .venv with sefusion (torch pinned by constraints.txt)",
        f"{data.get('command', '.venv/bin/python benchmarks/run.py')}"
        "   # checkpoints, mergekit venv, runs, JSON, this file",
        *[f"{sup.get('command', '?')}   # the supplementary run" for _, sup in supplements],
        ".venv/bin/python benchmarks/render.py "
        + (source or "benchmarks/results/RUN.json")
        + "".join(f" --supplement {src}" for src, _ in supplements)
        + "   # re-render from the JSON",
        "```",
        "",
    ]
    return "\n".join(out)


def newest_result(results: Path = RESULTS) -> Path:
    # supplementary runs live in results/supplements/, so the newest *full* run is the default
    runs = sorted(p for p in results.glob("*.json") if not p.name.endswith("-quick.json"))
    if not runs:
        raise SystemExit(f"no results JSON under {results}; run benchmarks/run.py first")
    return runs[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", type=Path, help="results JSON (default: newest full run)")
    p.add_argument("-o", "--output", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument(
        "--supplement", type=Path, action="append", default=[], help="a later partial run's JSON (repeatable)"
    )
    p.add_argument(
        "--notes", type=Path, default=REPO / "benchmarks" / "NOTES.md",
        help="markdown appended as engineering notes (default benchmarks/NOTES.md, if it exists)",
    )  # fmt: skip
    p.add_argument(
        "--causal", type=Path, default=REPO / "benchmarks" / "CAUSAL.md",
        help="markdown appended: causal LM fine-tuning and generation (default benchmarks/CAUSAL.md)",
    )  # fmt: skip
    p.add_argument(
        "--ray", type=Path, default=REPO / "benchmarks" / "RAY.md",
        help="markdown appended last: the study in process and on Ray (default benchmarks/RAY.md)",
    )  # fmt: skip
    a = p.parse_args(argv)
    path = (a.results or newest_result()).resolve()

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(REPO))
        except ValueError:
            return str(p)

    sups = [(rel(s), json.loads(s.read_text())) for s in a.supplement]
    notes = a.notes.read_text() if a.notes.is_file() else ""
    text = render(json.loads(path.read_text()), rel(path), sups, notes, rel(a.notes))
    for extra in (a.causal, a.ray):  # measurements of their own scripts, kept as written
        if extra.is_file():
            text = text.rstrip("\n") + "\n\n" + extra.read_text().strip() + "\n"
    a.output.write_text(text)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

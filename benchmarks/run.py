"""Side-by-side benchmark of sefusion and mergekit 0.1.5: one command, JSON out, BENCHMARKS.md rendered.

    .venv/bin/python benchmarks/run.py                     # the default plan (see --dry-run for its estimate)
    .venv/bin/python benchmarks/run.py --quick             # smoke test: ~56M params, 2 experts, 1 repeat
    .venv/bin/python benchmarks/run.py --sizes 0.2b --experts 4 --methods ties --repeats 1

For each (size, number of experts) it writes synthetic Llama-shaped checkpoints (cached under
benchmarks/.data/), then for each method runs sefusion and mergekit alternately (sefusion, mergekit,
sefusion, ...) on the same inputs, each as a child process whose wall time and peak RSS come from
`os.wait4`. Before every run the inputs are read once so both tools start from the same page-cache state;
outputs are deleted (and the disk synced) between runs. The I/O floor (benchmarks/io_floor.py: read the
inputs, write a base-sized output, no computation) is measured the same way. mergekit is installed into
benchmarks/.mergekit-venv on first use. Results: benchmarks/results/<UTC time>-<host>.json (every sample,
medians, ratios, machine and versions), rendered to BENCHMARKS.md by benchmarks/render.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402
import render  # noqa: E402

DATA = checkpoints.DATA
MK_VENV = HERE / ".mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
SEFUSION = REPO / ".venv" / "bin" / "sefusion"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

# mergekit flags, chosen as a performance-minded CPU user would (see MERGEKIT_FLAGS_WHY).
MERGEKIT_FLAGS = [
    "--no-cuda",
    "--lazy-unpickle",
    "--out-shard-size",
    "1B",
    "--no-copy-tokenizer",
    "--random-seed",
    "0",
    "--quiet",
]
MERGEKIT_FLAGS_WHY = (
    "mergekit flags: `--no-cuda` (CPU, as sefusion here); `--lazy-unpickle` (its low-memory loader); "
    "`--out-shard-size 1B` (parameters: 2 GB of bfloat16 shards, the same as sefusion's `--shard-size 2GB`); "
    "`--no-copy-tokenizer` (the synthetic models have none, and nothing may be downloaded); `--random-seed 0` "
    "(DARE); `--quiet` (no progress bars, as sefusion's `-q`). Not used: `--async-write` (trades memory for "
    "speed, measured no faster here), `-j` (torch already uses every core), `--low-cpu-memory`/`--read-to-gpu` "
    "(GPU only). Its model card stays on, as sefusion writes one too."
)
SEFUSION_FLAGS = ["-q", "--shard-size", "2GB"]
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# method -> sefusion params (+ per-model weight) and mergekit's equivalent (None: mergekit lacks it).
RECIPES: dict[str, dict] = {
    "linear": {
        "sefusion": {"params": {"normalize": True}, "weight": 1.0},
        "mergekit": {"parameters": {"normalize": True}, "model": {"weight": 1.0}, "base": False},
    },
    "task_arithmetic": {
        "sefusion": {"params": {"lambda": 1.0}, "weight": 1.0},
        "mergekit": {"parameters": {}, "model": {"weight": 1.0}, "base": True},
    },
    "ties": {
        "sefusion": {"params": {"density": 0.2, "lambda": 1.0}, "weight": 1.0},
        "mergekit": {
            "parameters": {"normalize": True},
            "model": {"density": 0.2, "weight": 1.0},
            "base": True,
        },
    },
    "dare_ties": {
        "sefusion": {"params": {"density": 0.5, "lambda": 1.0}, "weight": 1.0},
        "mergekit": {
            "parameters": {"normalize": True},
            "model": {"density": 0.5, "weight": 1.0},
            "base": True,
        },
    },
    "tall_masks": {"sefusion": {"params": {"lambdas": 0.4}}, "mergekit": None},
    "scaling_masks": {"sefusion": {"params": {"lambdas": 0.4}}, "mergekit": None},
    "consensus": {"sefusion": {"params": {"lambdas": 0.4, "k": 2}}, "mergekit": None},
}

# What the output comparison expects, per method (benchmarks/compare.py measures; render.py judges).
AGREEMENT = {
    # "equal": both tools within one bfloat16 step of each other and of the float64 reference;
    # "exact": sefusion within one step of the float64 reference, mergekit's distance reported;
    # "close" / "different": not equal by design, the size of the difference is reported.
    "linear": (
        "equal",
        "both average in float32 and round once to bfloat16, so both should be within one bfloat16 step "
        "of the float64 reference and of each other",
    ),
    "task_arithmetic": (
        "exact",
        "sefusion computes θ0 + Σ τ_t in float32 and should be within one bfloat16 step of the float64 "
        "reference; mergekit forms the task vectors, their sum and θ0 + Σ τ_t in bfloat16, so where "
        "θ0 and Σ τ_t nearly cancel its output can be many steps off (small in absolute terms)",
    ),
    "ties": (
        "close",
        "not bit-equal by design (docs/methods.md): mergekit keeps max(1, floor(density·n)) entries with "
        "arbitrary ties and elects signs in bfloat16, sefusion keeps ceil(density·n) with ties by index "
        "in float32",
    ),
    "dare_ties": (
        "different",
        "not comparable elementwise: each tool draws its own random DARE masks, and mergekit rescales "
        "kept entries to the L1 norm where sefusion divides by density; only the scale of the "
        "difference is recorded",
    ),
}

DEFAULT_SIZES = ["0.2b", "1b"]
DEFAULT_EXPERTS = [4, 8]
# The default plan, sized to finish in about 75 minutes on this project's 2-core machine (see --dry-run):
# sefusion's repeats per (size, experts); mergekit's where fewer (its TIES takes minutes at 1B; 0 skips
# it); and, where not every method fits, the methods run there. --repeats, --mergekit-repeats and
# --methods replace the table's entries with what was asked for.
DEFAULT_REPEATS = {("0.2b", 4): 3, ("0.2b", 8): 1, ("1b", 4): 1, ("1b", 8): 1}
DEFAULT_MERGEKIT_REPEATS = {("0.2b", 4): 2, ("1b", 8): 0}
DEFAULT_METHODS_AT = {("1b", 8): ("linear", "task_arithmetic", "ties", "tall_masks")}


@dataclass(frozen=True)
class Group:
    size: str
    experts: int
    reps: dict[str, int]  # tool -> runs per method (0: the tool does not run in this group)
    methods: list[str]


def make_plan(a: argparse.Namespace) -> list[Group]:
    plan = []
    for size in a.sizes:
        for n in a.experts:
            key = (size, n)
            r = a.repeats or DEFAULT_REPEATS.get(key, 1)
            if a.mergekit_repeats is not None:
                rm = min(a.mergekit_repeats, r)
            elif a.repeats is not None:
                rm = r
            else:
                rm = min(DEFAULT_MERGEKIT_REPEATS.get(key, r), r)
            reps = {t: {"sefusion": r, "mergekit": rm}[t] for t in a.tools}
            at = DEFAULT_METHODS_AT.get(key, render.METHODS)
            methods = a.methods or [m for m in render.METHODS if m in at]
            plan.append(Group(size, n, reps, methods))
    plan.sort(key=lambda g: (checkpoints.SIZES[g.size].params, g.experts))
    return plan


# Cost model for --dry-run and the progress estimate: seconds = fixed + per_gb * (GB of inputs read).
# Calibrated on this project's 2-core machine with other work beside it (0.2b, 4 experts: mergekit TIES
# 64-96 s, sefusion TIES 44 s; 1b, 4 experts: sefusion TIES about 230 s).
COST = {
    ("mergekit", "linear"): (6.0, 2.0),
    ("mergekit", "task_arithmetic"): (6.0, 3.0),
    ("mergekit", "ties"): (6.0, 42.0),
    ("mergekit", "dare_ties"): (6.0, 22.0),
    ("sefusion", "linear"): (3.0, 2.5),
    ("sefusion", "task_arithmetic"): (3.0, 4.0),
    ("sefusion", "ties"): (3.0, 20.0),
    ("sefusion", "dare_ties"): (3.0, 20.0),
    ("sefusion", "tall_masks"): (3.0, 10.0),
    ("sefusion", "scaling_masks"): (3.0, 10.0),
    ("sefusion", "consensus"): (3.0, 10.0),
    ("floor", "floor"): (0.1, 0.5),
    ("warm", "warm"): (0.0, 0.3),
    ("compare", "compare"): (0.0, 3.0),
}


# ---------------------------------------------------------------- processes


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(cmd: list[str], log: Path, env: dict[str, str], timeout: float, max_rss: int = 0) -> dict:
    """Run `cmd` as a child; its wall time, and its peak RSS and CPU time from `wait4` (that child only).

    Linux carries the forking process's peak RSS into the child's `ru_maxrss` (exec records the old memory
    map's high-water mark), so this harness keeps itself small: it never imports torch and writes the
    checkpoints in a child of its own. Its own peak is stored in the JSON as a bound on that error.
    A watchdog kills the child after `timeout` seconds, or once its RSS passes `max_rss` (0: no limit), so
    a blow-up is recorded as a failed run instead of waking the OOM killer on a shared machine.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        done = threading.Event()
        reason: list[str] = []

        def watch() -> None:
            while not done.wait(0.2):
                if time.perf_counter() - t0 > timeout:
                    reason.append(f"killed after the {timeout:.0f} s timeout")
                elif max_rss and (rss := _rss_bytes(proc.pid)) > max_rss:
                    reason.append(f"killed at {rss / 1e9:.1f} GB RSS (limit {max_rss / 1e9:.1f} GB)")
                else:
                    continue
                proc.kill()
                return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            done.set()
            watcher.join()
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4; tell Popen so it does not try again
    out = {
        "wall_s": round(wall, 4),
        "maxrss_bytes": ru.ru_maxrss * 1024,  # Linux reports KiB
        "user_s": round(ru.ru_utime, 3),
        "sys_s": round(ru.ru_stime, 3),
        "rc": rc,
        "timed_out": bool(reason) and "timeout" in reason[0],
    }
    if reason:
        out["killed"] = reason[0]
    return out


def warm(folders: list[Path]) -> float:
    """Read every file of the input folders once (plain reads) so each run starts from the same page cache."""
    t0 = time.perf_counter()
    buf = memoryview(bytearray(16 * 1024 * 1024))
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
    return time.perf_counter() - t0


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    for tmp in path.parent.glob(path.name + ".*"):  # a temp folder left beside OUT by a killed run
        shutil.rmtree(tmp, ignore_errors=True)
    os.sync()  # no dirty pages of the last output left to write back during the next run


def _capture(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


@dataclass(frozen=True)
class RunContext:
    folders: list[Path]
    prewarm: bool
    env: dict[str, str]
    timeout: float
    max_rss: int


def run_one(
    kind: str, cmd: list[str], out: Path, log: Path, repeat: int, *, keep: bool, ctx: RunContext
) -> dict:
    """One measured run; its output is deleted unless `keep` (kept for the output comparison)."""
    clean(out)
    # Pre-reading inputs that do not fit beside a merge would only evict themselves: skip it.
    w = warm(ctx.folders) if ctx.prewarm else 0.0
    load = os.getloadavg()[0]  # the machine is shared: how busy it was as the run started
    s = measure(cmd, log, ctx.env, ctx.timeout, ctx.max_rss)
    s.update(repeat=repeat, warm_s=round(w, 2), out_bytes=tree_bytes(out), load1_before=round(load, 2))
    if s["rc"] == 0 and not any(out.rglob("*.safetensors")) and not any(out.rglob("*.bin")):
        s["rc"], s["error"] = -1, "exited 0 but wrote no weights"
    if s["rc"] != 0:
        s["log_tail"] = log.read_text(errors="replace")[-3000:]
        print(f"    {kind} FAILED (rc {s['rc']}), log {log}:\n" + s["log_tail"][-1500:])
    if not keep or s["rc"] != 0:
        clean(out)
    return s


def agreement(method: str, sef_out: Path, mk_out: Path, folders: list[Path]) -> dict:
    """Compare sefusion's and mergekit's outputs of one method (and with a float64 reference where the
    method has a closed form) in a child process: this harness never imports torch (see `measure`)."""
    kind, why = AGREEMENT.get(method, ("different", "no expectation recorded"))
    cmd = [str(VENV_PYTHON), str(HERE / "compare.py"), method, str(sef_out), str(mk_out)]
    cmd += ["--base", str(folders[0]), "--experts", *map(str, folders[1:])]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    out: dict = {"expect": kind, "why": why, "a": "sefusion", "b": "mergekit"}
    try:
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        out["error"] = f"compare.py failed (rc {res.returncode}): {res.stderr[-1500:]}"
    return out


# ---------------------------------------------------------------- mergekit


def ensure_mergekit(log=print) -> Path:
    """benchmarks/.mergekit-venv with mergekit 0.1.5 (torch pinned by constraints.txt: installs from local disk)."""
    exe = MK_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        log(f"installing mergekit {MERGEKIT_VERSION} into {MK_VENV} (a few minutes, once)")
        shutil.rmtree(MK_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
        pip = [str(MK_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(
            pip + ["-c", str(REPO / "constraints.txt"), f"mergekit=={MERGEKIT_VERSION}"], check=True
        )
    got = _capture(
        [
            str(MK_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ]
    )
    if got != MERGEKIT_VERSION:
        raise SystemExit(f"{MK_VENV} holds mergekit {got}, not {MERGEKIT_VERSION}; remove it and run again")
    return exe


# ---------------------------------------------------------------- recipes


def _yaml(obj: object, indent: int = 0) -> str:
    """Tiny YAML writer (JSON values are valid YAML scalars) so this harness needs no PyYAML."""
    pad = " " * indent
    if isinstance(obj, dict):
        return "".join(
            f"{pad}{k}:\n{_yaml(v, indent + 2)}"
            if isinstance(v, (dict, list)) and v
            else f"{pad}{k}: {json.dumps(v)}\n"
            for k, v in obj.items()
        )
    if isinstance(obj, list):
        out = ""
        for item in obj:
            body = _yaml(item, indent + 2)
            out += f"{pad}- {body.lstrip()}"
        return out
    return f"{pad}{json.dumps(obj)}\n"


def sefusion_recipe(method: str, base: Path, experts: list[Path], seed: int) -> dict:
    spec = RECIPES[method]["sefusion"]
    models = []
    for e in experts:
        m: dict = {"path": str(e), "name": e.name}
        if "weight" in spec:
            m["weight"] = spec["weight"]
        models.append(m)
    return {
        "method": method,
        "base": str(base),
        "models": models,
        "params": spec["params"],
        "dtype": "bfloat16",
        "seed": seed,
    }


def mergekit_config(method: str, base: Path, experts: list[Path]) -> dict | None:
    spec = RECIPES[method]["mergekit"]
    if spec is None:
        return None
    cfg: dict = {"merge_method": method}
    if spec["base"]:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(e), "parameters": dict(spec["model"])} for e in experts]
    if spec["parameters"]:
        cfg["parameters"] = spec["parameters"]
    cfg["dtype"] = "bfloat16"
    return cfg


# ---------------------------------------------------------------- plan


def estimate(plan: list[Group]) -> float:
    """Seconds of runs for the plan (COST model; each method compared once, in the first group)."""
    total = 0.0
    compared: set[str] = set()
    for g in plan:
        gb = (g.experts + 1) * checkpoints.SIZES[g.size].model_bytes / 1e9
        for m in g.methods:
            for tool, reps in g.reps.items():
                if tool == "mergekit" and RECIPES[m]["mergekit"] is None:
                    continue
                fixed, per_gb = COST.get((tool, m), (5.0, 10.0))
                total += reps * (fixed + per_gb * gb + COST[("warm", "warm")][1] * gb)
            if all(g.reps.get(t) for t in ("sefusion", "mergekit")) and m in AGREEMENT and m not in compared:
                compared.add(m)
                total += COST[("compare", "compare")][1] * gb
        total += max(g.reps.values()) * (COST[("floor", "floor")][0] + COST[("floor", "floor")][1] * gb)
    return total


def _generation_estimate(plan: list[Group], seed: int, root: Path = DATA) -> float:
    most: dict[str, int] = {}
    for g in plan:
        most[g.size] = max(most.get(g.size, 0), g.experts)
    # ~100 M parameters a second per model on two cores (randn + add + bf16 + write)
    return sum(checkpoints.required_bytes(s, seed, n, root) / 2 / 100e6 for s, n in most.items())


def machine_info() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "host": platform.node(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "ram_bytes": _meminfo("MemTotal"),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def versions(with_mergekit: bool) -> dict:
    got = _capture(
        [
            str(VENV_PYTHON),
            "-c",
            "import importlib.metadata as m; print(m.version('sefusion'), m.version('torch'))",
        ]
    ).split()
    out = {
        "sefusion": got[0] if len(got) == 2 else "?",
        "sefusion_torch": got[1] if len(got) == 2 else "?",
        "git_commit": _capture(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"]),
        "git_dirty": _capture(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
        not in ("", "?"),
    }
    if with_mergekit:
        got = _capture(
            [
                str(MK_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), m.version('transformers'))",
            ]
        ).split()
        if len(got) == 3:
            out.update(mergekit=got[0], mergekit_torch=got[1], mergekit_transformers=got[2])
    return out


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"of {', '.join(checkpoints.SIZES)}")
    p.add_argument("--experts", default=",".join(map(str, DEFAULT_EXPERTS)), help="numbers of experts")
    p.add_argument("--repeats", type=int, help="runs per tool and method (default: per size, see --dry-run)")
    p.add_argument(
        "--methods", help=f"comma-separated (default: the plan's; all are {', '.join(render.METHODS)})"
    )
    p.add_argument("--mergekit-repeats", type=int, help="runs of mergekit per method (default: as --repeats)")
    p.add_argument("--tools", default="sefusion,mergekit", help="sefusion,mergekit (or one of them)")
    p.add_argument(
        "--no-compare", action="store_true", help="skip comparing sefusion's and mergekit's outputs"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: size 0.05b, 2 experts, 1 repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA, help=f"checkpoints and work folders (default {DATA})")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before one run is killed")
    p.add_argument(
        "--max-rss-fraction",
        type=float,
        default=0.75,
        help="kill a run whose RSS passes this share of RAM (0: never; default 0.75)",
    )
    p.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/<time>-<host>.json)")
    p.add_argument(
        "--markdown", type=Path, help="rendered markdown (default BENCHMARKS.md; quick: under .data)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated time, run nothing"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.experts, a.repeats = "0.05b", "2", a.repeats or 1
    a.sizes, a.methods, a.tools = _csv(a.sizes), _csv(a.methods or ""), _csv(a.tools)
    a.experts = [int(x) for x in _csv(a.experts)]
    bad = [s for s in a.sizes if s not in checkpoints.SIZES]
    bad += [m for m in a.methods if m not in RECIPES]
    bad += [t for t in a.tools if t not in ("sefusion", "mergekit")]
    if bad or not a.sizes or not a.tools or any(n < 1 for n in a.experts):
        p.error(
            f"unknown {bad}; sizes: {', '.join(checkpoints.SIZES)}; methods: {', '.join(RECIPES)}; "
            "tools: sefusion, mergekit; experts >= 1"
        )
    if (a.repeats is not None and a.repeats < 1) or (
        a.mergekit_repeats is not None and a.mergekit_repeats < 1
    ):
        p.error("--repeats and --mergekit-repeats must be >= 1")
    return a


# ---------------------------------------------------------------- main


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt_sample(s: dict) -> str:
    return f"{s['wall_s']:7.2f} s {s['maxrss_bytes'] / 1e6:7.0f} MB" + (
        "" if s["rc"] == 0 else f"  FAILED rc={s['rc']}"
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    plan = make_plan(a)
    with_mk = any(g.reps.get("mergekit") for g in plan)
    est = estimate(plan)
    gen = _generation_estimate(plan, a.seed, a.data)
    print("plan:")
    for g in plan:
        sz = checkpoints.SIZES[g.size]
        reps = ", ".join(f"{t} {r}" for t, r in g.reps.items())
        print(f"  {g.size} ({sz.params / 1e6:.0f}M params) base + {g.experts} experts; repeats {reps}")
        print(f"    methods: {', '.join(g.methods)}")
    print(f"estimated time: {est / 60:.0f} min of runs + {gen / 60:.0f} min writing checkpoints (once)")

    # Disk: every checkpoint still to write, plus the largest output (a bundle: float32 vector + masks).
    most: dict[str, int] = {}
    for g in plan:
        most[g.size] = max(most.get(g.size, 0), g.experts)
    need = sum(checkpoints.required_bytes(s, a.seed, n, a.data) for s, n in most.items())
    need += 3 * max(checkpoints.SIZES[g.size].model_bytes for g in plan)
    if a.dry_run:
        print(f"disk needed: {need / 1e9:.1f} GB under {a.data}")
        return 0
    checkpoints.check_disk(a.data, need)

    mk_exe = ensure_mergekit() if with_mk else None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = re.sub(r"[^A-Za-z0-9]+", "-", platform.node())[:24].strip("-") or "host"
    out_json = a.output or HERE / "results" / f"{stamp}-{host}{'-quick' if a.quick else ''}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CHILD_ENV, "HF_HOME": str(a.data / "hf-home")}
    command = " ".join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    data: dict = {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/" + command,
        "quick": a.quick,
        "machine": machine_info(),
        "versions": versions(with_mk),
        "settings": {
            "seed": a.seed,
            "tools": a.tools,
            "sefusion_cmd": f".venv/bin/sefusion merge RECIPE.yaml OUT {' '.join(SEFUSION_FLAGS)}",
            "mergekit_cmd": f"benchmarks/.mergekit-venv/bin/mergekit-yaml CONFIG.yml OUT {' '.join(MERGEKIT_FLAGS)}",
            "floor_cmd": ".venv/bin/python benchmarks/io_floor.py OUT BASE EXPERT...",
            "mergekit_flags_why": MERGEKIT_FLAGS_WHY,
            "env": CHILD_ENV,
            "inputs_fit_rule": "inputs_bytes <= 0.75 * ram_bytes",
            "max_rss_bytes": int(a.max_rss_fraction * machine_info()["ram_bytes"]),
            "recipes": {
                m: {
                    "sefusion": {k: v for k, v in RECIPES[m]["sefusion"].items()},
                    "mergekit": None
                    if RECIPES[m]["mergekit"] is None
                    else {
                        "parameters": RECIPES[m]["mergekit"]["parameters"],
                        "models[]": RECIPES[m]["mergekit"]["model"],
                    },
                }
                for m in render.METHODS
                if any(m in g.methods for g in plan)
            },
            "agreement_expectations": {m: {"expect": k, "why": w} for m, (k, w) in AGREEMENT.items()},
        },
        "plan": [
            {"size": g.size, "experts": g.experts, "repeats": g.reps, "methods": g.methods} for g in plan
        ],
        "groups": [],
    }
    print(f"results: {out_json}")
    t_start = time.perf_counter()

    compared: set[str] = set()
    for g in plan:
        size, n, reps = g.size, g.experts, g.reps
        repeats = max(reps.values())
        spec = checkpoints.SIZES[size]
        t0 = time.perf_counter()
        # In a child: this process must stay small (see `measure`).
        gen_cmd = [str(VENV_PYTHON), str(HERE / "checkpoints.py"), "--size", size, "--experts", str(n)]
        subprocess.run(gen_cmd + ["--seed", str(a.seed), "--root", str(a.data)], check=True)
        folders = [checkpoints.model_dir(size, a.seed, m, a.data) for m in checkpoints.model_names(n)]
        gen_s = time.perf_counter() - t0
        base, experts = folders[0], folders[1:]
        work = a.data / "work" / f"{size}-{n}"
        inputs_bytes = sum(tree_bytes(f) for f in folders)
        group = {
            "size": size,
            "experts": n,
            "params": spec.params,
            "model_bytes": spec.model_bytes,
            "inputs_bytes": inputs_bytes,
            "largest_tensor_bytes": spec.largest_tensor_bytes,
            "shards": len(list(base.glob("*.safetensors"))),
            "inputs_fit_in_ram": inputs_bytes <= 0.75 * data["machine"]["ram_bytes"],
            "mem_available_bytes": _meminfo("MemAvailable"),
            "repeats": repeats,
            "repeats_by_tool": dict(reps),
            "generate_s": round(gen_s, 1),
            "floor": {"samples": []},
            "methods": {},
        }
        data["groups"].append(group)
        # What every run of this group needs.
        ctx = RunContext(
            folders=folders,
            prewarm=group["inputs_fit_in_ram"],
            env=env,
            timeout=a.timeout,
            max_rss=int(a.max_rss_fraction * data["machine"]["ram_bytes"]),
        )
        print(
            f"\n== {size} base + {n} experts ({inputs_bytes / 1e9:.2f} GB of inputs), "
            + ", ".join(f"{t} {r} repeat(s)" for t, r in reps.items())
        )

        for r in range(repeats):
            out = work / "out-floor"
            s = run_one(
                "floor",
                [sys.executable, str(HERE / "io_floor.py"), str(out), *map(str, folders)],
                out,
                work / "logs" / f"floor-r{r}.log",
                r,
                keep=False,
                ctx=ctx,
            )
            group["floor"]["samples"].append(s)
            print(f"  I/O floor      {_fmt_sample(s)}")
        _write_json(out_json, data)

        for method in g.methods:
            entry: dict = {}
            group["methods"][method] = entry
            cmds = {}
            if reps.get("sefusion"):
                recipe = work / "recipes" / f"sefusion-{method}.yaml"
                recipe.parent.mkdir(parents=True, exist_ok=True)
                recipe.write_text(_yaml(sefusion_recipe(method, base, experts, a.seed)))
                out = work / f"out-sefusion-{method}"
                cmds["sefusion"] = ([str(SEFUSION), "merge", str(recipe), str(out), *SEFUSION_FLAGS], out)
                entry["sefusion"] = {"samples": []}
            cfg = mergekit_config(method, base, experts)
            if mk_exe is not None and cfg is not None and reps.get("mergekit"):
                path = work / "recipes" / f"mergekit-{method}.yml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(_yaml(cfg))
                out = work / f"out-mergekit-{method}"
                cmds["mergekit"] = ([str(mk_exe), str(path), str(out), *MERGEKIT_FLAGS], out)
                entry["mergekit"] = {"samples": []}
            else:
                entry["mergekit"] = None
            # Once per method: in the first (smallest) group where both tools run it.
            compare = len(cmds) == 2 and not a.no_compare and method not in compared
            for r in range(max(reps[tool] for tool in cmds)):
                # alternate: sefusion, mergekit, sefusion, mergekit, ... (mergekit may stop earlier)
                for tool, (cmd, out) in cmds.items():
                    if r >= reps[tool]:
                        continue
                    log = work / "logs" / f"{tool}-{method}-r{r}.log"
                    s = run_one(tool, cmd, out, log, r, keep=compare and r == 0, ctx=ctx)
                    entry[tool]["samples"].append(s)
                    print(f"  {method:15s}{tool:9s} r{r} {_fmt_sample(s)}")
                    _write_json(out_json, data)
                if compare and r == 0:
                    compared.add(method)
                    entry["agreement"] = agreement(method, cmds["sefusion"][1], cmds["mergekit"][1], folders)
                    print(f"  {method:15s}outputs: {render.agreement_text(entry['agreement'])}")
                    for _, out in cmds.values():
                        clean(out)
                    _write_json(out_json, data)
            row = render.method_row(entry)
            for tool in ("sefusion", "mergekit"):
                if entry.get(tool):
                    entry[tool].update(row[tool])
            entry["speedup"], entry["memory_ratio"] = row["speedup"], row["memory_ratio"]
            if row["speedup"] is not None:
                print(f"  {method:15s}speed-up {row['speedup']:.1f}x, memory ratio {row['memory_ratio']:.2f}")
            _write_json(out_json, data)
        group["floor"].update(render.summarize(group["floor"]["samples"]))
        _write_json(out_json, data)

    data["total_s"] = round(time.perf_counter() - t_start, 1)
    data["harness_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _write_json(out_json, data)
    print(f"\ntotal {data['total_s'] / 60:.1f} min; results {out_json}")
    for t in render.targets(data):
        print(f"  {t['status']:4s}  {t['target']}")
    md = a.markdown or (a.data / "BENCHMARKS-quick.md" if a.quick else REPO / "BENCHMARKS.md")
    try:
        source = str(out_json.resolve().relative_to(REPO))
    except ValueError:
        source = str(out_json)
    md.write_text(render.render(data, source))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

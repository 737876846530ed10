"""A real study in process and on a two-node Ray cluster simulated on this machine: wall time per phase,
pieces, overhead per piece, and whether the rows agree.

    python benchmarks/study_on_ray.py [--budget tiny|quick] [--tasks a,b,c] [--nodes 2] [--store-mb 400]

Each run starts from an empty cache of its own (corpus, tasks, experts, statistics, records all built
again), the in-process one first, then the Ray one (`sefusion study --ray` in Python: `StudyConfig.ray`)
on `ray.cluster_utils.Cluster` (`--nodes` nodes of one CPU each, `--piece-cpus 1`). Both runs set
SEFUSION_THREADS=1 (one torch thread per process, as a piece on one CPU has), so their floats may be
compared bit for bit. `--budget tiny`: the tests' 2-layer 32-wide BERT (all-MiniLM-L6-v2's tokenizer)
and their tiny budget; `quick`: all-MiniLM-L6-v2 at the demo's budget. Prints a table and one JSON line.
Needs `sefusion[ray]` and the dev extra (the tiny base is built as the tests build it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from sefusion.study import StudyConfig, run_study  # noqa: E402
from sefusion.study.executor import LocalExecutor, RayExecutor  # noqa: E402
from sefusion.study.scenarios import Scenario  # noqa: E402

TINY_TASKS = "consistency-python,defect-python,search-python"


@dataclass
class Timed:
    """An executor that times each run() (one per phase of the study) and counts the pieces it ran."""

    inner: Any
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_process(self) -> bool:
        return self.inner.in_process

    def session(self, total: int | None = None) -> Any:
        return self.inner.session(total)

    def run(self, pieces: Any, *, done: Any = None, on_done: Any = None) -> dict[str, Any]:
        ran: list[str] = []

        def counted(key: str, result: Any) -> None:
            ran.append(key)
            if on_done is not None:
                on_done(key, result)

        t0 = time.perf_counter()
        out = self.inner.run(pieces, done=done, on_done=counted)
        self.phases.append({"pieces": len(ran), "wall_s": round(time.perf_counter() - t0, 2)})
        return out


def budget(name: str) -> Any:
    from sefusion.models import Budget

    if name == "tiny":  # the end-to-end test's
        return Budget(name="tiny", steps=6, batch_size=8, max_length=64, lr=1e-3, n_train=48, n_validation=16,
                      n_test=16, pool=16)  # fmt: skip
    return name


def one_run(root: Path, args: argparse.Namespace, base: Path | None, executor: Any, ray: bool) -> dict:
    cfg = StudyConfig(
        scenario=Scenario("bench", tuple(args.tasks.split(",")), "benchmark"), out=root / "report",
        budget=budget(args.budget), base=base, cache=root / "cache", quiet=True, ray=ray or None,
    )  # fmt: skip
    timed = Timed(executor)
    t0 = time.perf_counter()
    results = run_study(cfg, executor=timed)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "phases": timed.phases, "rows": results["rows"]}


def on_cluster(root: Path, args: argparse.Namespace, base: Path | None) -> tuple[dict, float]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
    )
    node = {"num_cpus": 1, "object_store_memory": args.store_mb * 2**20}
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # a loaded machine starts nodes slowly
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        start = time.perf_counter() - t0
        return one_run(root, args, base, RayExecutor(quiet=True), True), start
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=("tiny", "quick"), default="tiny")
    ap.add_argument("--tasks", default=TINY_TASKS, help="comma-separated tasks (default: the tests' three)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--store-mb", type=int, default=400, help="object store of each node (MB)")
    args = ap.parse_args()
    os.environ["SEFUSION_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="study-on-ray-") as tmp:
        root = Path(tmp)
        base = None
        if args.budget == "tiny":
            from conftest import tiny_base

            base = tiny_base(root / "base")
        local = one_run(root / "local", args, base, LocalExecutor(quiet=True), False)
        remote, start = on_cluster(root / "ray", args, base)
    same = json.dumps(local.pop("rows"), sort_keys=True) == json.dumps(remote.pop("rows"), sort_keys=True)
    pieces = sum(p["pieces"] for p in remote["phases"])
    res = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "budget": args.budget, "tasks": args.tasks,
        "nodes": args.nodes, "pieces": pieces, "local": local, "ray": remote, "ray_start_s": round(start, 1),
        "ray_minus_local_ms_per_piece": round(1000 * (remote["wall_s"] - local["wall_s"]) / pieces, 1),
        "identical_rows": same,
    }  # fmt: skip
    for name, p_local, p_ray in zip(
        ("experts", "candidates", "test"), local["phases"], remote["phases"], strict=True
    ):
        print(
            f"{name:10s} {p_ray['pieces']:4d} pieces  local {p_local['wall_s']:8.1f} s  ray {p_ray['wall_s']:8.1f} s"
        )
    print(f"study      {pieces:4d} pieces  local {local['wall_s']:8.1f} s  ray {remote['wall_s']:8.1f} s "
          f"(+ cluster start {start:.1f} s); rows identical: {same}")  # fmt: skip
    print(json.dumps(res))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

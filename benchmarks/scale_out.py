"""The study executor in process against a two-node Ray cluster on this machine: wall time and overhead.

    python benchmarks/scale_out.py [--tasks 4] [--methods 3] [--grid 8] [--rounds 100000] [--empty 200]

Two DAGs, each run by LocalExecutor and by RayExecutor on `ray.cluster_utils.Cluster` (two nodes of one
CPU each, 80 MB object stores, no dashboard):
- study: shaped like a study (data -> expert per task -> candidates of every method -> choice per
  method); every piece hashes `--rounds` times (CPU-bound, deterministic), so both runs must agree.
- empty: `--empty` independent pieces that do nothing: what the executor itself costs per piece.
Reports wall times, the local piece time summed (`work_s`), and the Ray run's overhead per piece:
(wall x CPU slots - work) / pieces for the study DAG (includes slots idle for want of ready pieces),
wall x slots / pieces for the empty one. Prints a table and one JSON line. Needs `sefusion[ray]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sefusion.study.executor import LocalExecutor, Piece, RayExecutor  # noqa: E402

NODES, STORE = 2, 80 * 2**20


def work(key: str, rounds: int, *deps: str) -> str:
    h = hashlib.sha256("|".join((key, *deps)).encode())
    for _ in range(rounds):
        h = hashlib.sha256(h.digest())
    return h.hexdigest()[:16]


def nothing(i: int) -> int:
    return i


def study_dag(tasks: int, methods: int, grid: int, rounds: int) -> list[Piece]:
    names = [f"t{i}" for i in range(tasks)]
    pieces = [Piece(f"data/{t}", work, (f"data/{t}", rounds)) for t in names]
    pieces += [Piece(f"expert/{t}", work, (f"expert/{t}", rounds), deps=(f"data/{t}",)) for t in names]
    experts = tuple(f"expert/{t}" for t in names)
    for m in range(methods):
        cands = tuple(f"cand/m{m}/{g}" for g in range(grid))
        pieces += [Piece(c, work, (c, rounds), deps=experts) for c in cands]
        pieces.append(Piece(f"choice/m{m}", work, (f"choice/m{m}", rounds), deps=cands))
    return pieces


def timed(executor, pieces: list[Piece]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = executor.run(pieces)
    return time.perf_counter() - t0, out


def piece_times(pieces: list[Piece]) -> float:
    """The pieces' own compute time, summed: each run once in this process, in dependency order."""
    total, results = 0.0, {}
    for p in pieces:  # study_dag lists every piece after its deps
        t0 = time.perf_counter()
        results[p.key] = p(*(results[d] for d in p.deps))
        total += time.perf_counter() - t0
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--methods", type=int, default=3)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=100_000)
    ap.add_argument("--empty", type=int, default=200)
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    study = study_dag(args.tasks, args.methods, args.grid, args.rounds)
    empty = [Piece(f"e{i}", nothing, (i,)) for i in range(args.empty)]
    work_s = piece_times(study)
    local_s, local_out = timed(LocalExecutor(quiet=True), study)
    local_empty_s, _ = timed(LocalExecutor(quiet=True), empty)

    src = str(Path(__file__).resolve().parents[1] / "src")  # workers import sefusion (and this file) too
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [src, str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
    )
    t0 = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False},
    )
    try:
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=1, object_store_memory=STORE)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        start_s = time.perf_counter() - t0
        ray_s, ray_out = timed(RayExecutor(quiet=True), study)
        ray_empty_s, _ = timed(RayExecutor(quiet=True), empty)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if ray_out != local_out:
        print("the Ray run's results differ from the local run's", file=sys.stderr)
        return 1
    n = len(study)
    res = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "ray": ray.__version__,
        "pieces": n,
        "work_s": round(work_s, 2),
        "local_s": round(local_s, 2),
        "ray_s": round(ray_s, 2),
        "ray_start_s": round(start_s, 2),
        "local_overhead_ms_per_piece": round(1000 * (local_s - work_s) / n, 1),
        "ray_overhead_ms_per_piece": round(1000 * (ray_s * NODES - work_s) / n, 1),
        "empty_pieces": args.empty,
        "local_empty_ms_per_piece": round(1000 * local_empty_s / args.empty, 3),
        "ray_empty_ms_per_piece": round(1000 * ray_empty_s * NODES / args.empty, 1),
        "identical": True,
    }
    print(f"study DAG: {n} pieces, {work_s:.2f} s of piece work")
    print(f"  local {local_s:.2f} s ({res['local_overhead_ms_per_piece']} ms/piece overhead)")
    print(
        f"  ray, {NODES} nodes x 1 CPU: {ray_s:.2f} s ({res['ray_overhead_ms_per_piece']} ms/piece overhead), cluster start {start_s:.1f} s"
    )
    print(
        f"empty DAG: {args.empty} pieces: local {res['local_empty_ms_per_piece']} ms/piece, ray {res['ray_empty_ms_per_piece']} CPU-ms/piece"
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

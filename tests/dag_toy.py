"""Study-shaped toy DAGs for the executor tests: data -> expert per task -> candidates per method -> choice.

Every piece is a pure function of its arguments (seeded), so any executor and any order give one result.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

from sefusion.errors import SefusionError
from sefusion.study.executor import Piece


def data(task: str, seed: int) -> list[float]:
    rng = random.Random(f"{task}/{seed}")
    return [rng.random() for _ in range(8)]


def expert(task: str, lr: float, rows: list[float]) -> dict:
    return {"task": task, "weights": [lr * x + i for i, x in enumerate(rows)]}


def candidate(method: str, lam: float, *experts: dict) -> dict:
    merged = [lam * sum(w) / len(w) for w in zip(*(e["weights"] for e in experts), strict=True)]
    score = round(sum(merged[::2]) - sum(merged[1::2]) ** 2 / 50 + len(method), 12)
    return {"method": method, "lam": lam, "score": score}


def choose(method: str, *cands: dict) -> dict:
    best = max(cands, key=lambda c: (c["score"], -c["lam"]))
    return {"method": method, "lam": best["lam"], "test": round(best["score"] * 0.9, 12)}


def broken(*_: object) -> None:
    raise SefusionError("task t1: bad data on line 3 of train.jsonl")


def study(tasks: int = 3, methods: tuple[str, ...] = ("ta", "ties"), grid: int = 3, seed: int = 0):
    """The pieces of a toy study, listed as a study lists them: data, experts, then candidates by method."""
    names = [f"t{i}" for i in range(tasks)]
    pieces = [Piece(f"data/{t}", data, (t, seed)) for t in names]
    pieces += [Piece(f"expert/{t}", expert, (t, 0.5), deps=(f"data/{t}",)) for t in names]
    experts = tuple(f"expert/{t}" for t in names)
    for m in methods:
        lams = [round(0.2 + 0.3 * k, 2) for k in range(grid)]
        pieces += [Piece(f"cand/{m}/{lam}", candidate, (m, lam), deps=experts) for lam in lams]
        pieces.append(Piece(f"choice/{m}", choose, (m,), deps=tuple(f"cand/{m}/{lam}" for lam in lams)))
    return pieces


def mix(key: str, *deps: str) -> str:
    """A random DAG's piece: a digest of its key and its inputs (any wrong input changes every later one)."""
    return hashlib.sha256("|".join((key, *deps)).encode()).hexdigest()[:16]


def killable(marker: str, fn, *args):
    """`fn(*args)`, except that the first attempt writes its PID to `marker` and hangs until it is killed."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(120)
        raise RuntimeError("the worker running this piece was meant to be killed")
    return fn(*args)

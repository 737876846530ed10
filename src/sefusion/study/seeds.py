"""A study over several training seeds: the whole pipeline once per seed, on one fixed data split.

Seed i of N (i = 0..N-1) trains with seed `cfg.seed + i`: the experts, the pretrained heads and the
multitask model are fine-tuned with it, DARE draws its masks with it, statistics sample their examples
with it; candidates are selected on validation and scored on test within the seed. The data split
depends on `cfg.data_seed` alone, so every seed sees the same tasks (the same fingerprints).

Each seed is a study of its own: its models are cached under keys that hold its seed and its
evaluations go to records keyed by it, so a rerun with more seeds trains and scores only the new ones.
A single seed is exactly the one-seed study; with several, results.json is the first seed's study in
full plus, per row and task, the mean ± sd over seeds (`over_seeds`), each seed's rows with their
bootstrap intervals (`per_seed`), and each seed's per-example scores in its own scores file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import uncertainty as U
from .scenarios import StudyError

log = logging.getLogger("sefusion")

SCORES_FILE = "scores.json"
_PER_SEED_ROW = ("method", "params", "validation", "test", "normalized", "avg_normalized", "readings")


def training_seeds(cfg: Any) -> list[int]:
    """The training seed of each of the study's seeds."""
    if not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise StudyError(f"seeds must be a whole number of at least 1, got {cfg.seeds!r}")
    return [cfg.seed + i for i in range(cfg.seeds)]


def records_path(records: Path | None, first: int, seed: int) -> Path | None:
    """The evaluation records of one seed: the given file for the first seed, beside it for the others
    (FILE.jsonl -> FILE-seed1.jsonl), since a records file belongs to one seed's study."""
    if records is None or seed == first:
        return records
    path = Path(records)
    return path.with_name(f"{path.stem}-seed{seed}{path.suffix}")


def scores_name(seed: int, first: int) -> str:
    return SCORES_FILE if seed == first else f"scores-seed{seed}.json"


def run_seeds(cfg: Any, make_study: Callable[[Any], Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(results, {scores file name: document}) of the study run once per training seed."""
    seeds = training_seeds(cfg)
    runs, documents = [], {}
    for seed in seeds:
        if len(seeds) > 1 and not cfg.quiet:
            log.info("seed %d of %d: training seed %d", seeds.index(seed) + 1, len(seeds), seed)
        one = dataclasses.replace(cfg, seed=seed, seeds=1, records=records_path(cfg.records, seeds[0], seed))
        study = make_study(one)
        runs.append(study.run())
        if study.scores_document is not None:
            documents[scores_name(seed, seeds[0])] = study.scores_document
    results = runs[0] if len(runs) == 1 else combine(runs, cfg.data_seed)
    return results, documents


def combine(runs: Sequence[Mapping[str, Any]], data_seed: int) -> dict[str, Any]:
    """The results of several seeds' studies as one: the first seed's in full, with the mean ± sd over
    seeds of every row's scores, the experts' scores and the paired differences, and each seed's rows."""
    _same_data(runs)
    first = runs[0]
    out = dict(first)
    out["seeds"] = [r["seed"] for r in runs]
    out["data_seed"] = data_seed
    out["rows"] = [{**row, "over_seeds": row_over_seeds(row["method"], runs)} for row in first["rows"]]
    out["experts"] = {
        t: {**e, "over_seeds": {s: _over([r["experts"][t][s] for r in runs]) for s in ("validation", "test")}}
        for t, e in first["experts"].items()
    }
    out["comparisons_over_seeds"] = comparisons_over_seeds(runs)
    out["per_seed"] = [_seed_entry(r, first["seed"]) for r in runs]
    timings: dict[str, float] = {}
    for r in runs:
        for k, v in (r.get("timings_s") or {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 1)
    out["timings_s"], out["wall_s"] = timings, round(sum(r.get("wall_s", 0.0) for r in runs), 1)
    return out


def _same_data(runs: Sequence[Mapping[str, Any]]) -> None:
    """Every seed must have scored the same data: its split is the data seed's, whatever the training seed."""
    prints = [{t: (d or {}).get("fingerprint") for t, d in r["data"].items()} for r in runs]
    for r, p in zip(runs[1:], prints[1:], strict=True):
        if p != prints[0]:
            raise StudyError(f"training seed {r['seed']} built other task data than seed {runs[0]['seed']}")


def _over(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Mean and sd over seeds; None when some seed has no finite value (e.g. a gain kept left undefined)."""
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return U.over_seeds([float(v) for v in values])  # type: ignore[arg-type]


def row_over_seeds(method: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row's mean ± sd over seeds: test and normalized score per task, average normalized score,
    gain kept per task (point estimates), and per task how many seeds flag it (below pretrained/chance)."""
    rows = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
    tasks = list(runs[0]["tasks"])

    def reading(row: Mapping[str, Any], t: str) -> Mapping[str, Any]:
        return (row.get("readings") or {}).get(t) or {}

    def gain(row: Mapping[str, Any], t: str) -> float | None:
        g = reading(row, t).get("gain_kept")
        return None if g is None else g.get("estimate")

    flags: dict[str, dict[str, int]] = {}
    for t in tasks:
        for row in rows:
            for f in reading(row, t).get("flags") or []:
                flags.setdefault(t, {})[f] = flags.get(t, {}).get(f, 0) + 1
    return {
        "test": {t: _over([r["test"][t] for r in rows]) for t in tasks},
        "normalized": {t: _over([r["normalized"][t] for r in rows]) for t in tasks},
        "avg_normalized": _over([r["avg_normalized"] for r in rows]),
        "gain_kept": {
            t: _over([gain(r, t) for r in rows]) for t in tasks if any(reading(r, t) for r in rows)
        },
        "flags": flags,
    }


def comparisons_over_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task and pair a - b: the difference's mean ± sd over seeds and in how many seeds its paired
    interval excludes 0 below and above (pairs some seed lacks are left out)."""
    out: dict[str, dict[str, Any]] = {}
    first = runs[0].get("comparisons") or {}
    for t, pairs in first.items():
        for pair in pairs:
            ds = [((r.get("comparisons") or {}).get(t) or {}).get(pair) for r in runs]
            if any(d is None for d in ds):
                continue
            out.setdefault(t, {})[pair] = {
                **U.over_seeds([d["estimate"] for d in ds]),  # type: ignore[index]
                "significant_below": sum(bool(d["significant"] and d["estimate"] < 0) for d in ds),  # type: ignore[index]
                "significant_above": sum(bool(d["significant"] and d["estimate"] > 0) for d in ds),  # type: ignore[index]
            }
    return out


def _seed_entry(run: Mapping[str, Any], first: int) -> dict[str, Any]:
    """One seed's rows (selected params, scores, bootstrap readings), experts, differences, scores file."""
    return {
        "seed": run["seed"],
        "rows": [{k: r[k] for k in _PER_SEED_ROW if k in r} for r in run["rows"]],
        "experts": {t: {s: e[s] for s in ("validation", "test")} for t, e in run["experts"].items()},
        "comparisons": run.get("comparisons") or {},
        "scores_file": scores_name(run["seed"], first),
        "wall_s": run.get("wall_s"),
    }


__all__ = [
    "combine",
    "comparisons_over_seeds",
    "records_path",
    "row_over_seeds",
    "run_seeds",
    "training_seeds",
]

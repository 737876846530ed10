"""Per-example scores stored compactly, so every interval can be recomputed from what a study wrote.

A study scores each row on each task's test examples; the intervals need each example's score and its
source file. Stored as JSON (base64, little-endian), exact on reading back:

* 0/1 correctness: ``{"n": N, "bits": base64(packbits)}`` (N/8 bytes: 49 for 388 examples);
* reciprocal ranks 1/r: ``{"n": N, "ranks": base64(uint16 or uint32 r), "dtype": "<u2"}`` (2 bytes each);
* anything else: ``{"n": N, "f8": base64(float64)}``.

A task's source files: ``{"files": [path, ...], "index": base64(uint16/uint32 file index per example),
"dtype": "<u2"}``, files in order of first appearance.

The scores file of a study (``scores.json`` beside ``results.json``)::

    {"format": "sefusion-scores", "version": 1,
     "tasks": {task: {"n": N, "fingerprint": sha256 of the task's data, "clusters": {files, index}}},
     "rows": {row label: {task: encoded per-example scores}}}
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .uncertainty import UncertaintyError

FORMAT = "sefusion-scores"
VERSION = 1


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _unsigned(values: np.ndarray) -> tuple[str, str]:
    dtype = "<u2" if values.max(initial=0) < 2**16 else "<u4"
    return _b64(values.astype(dtype)), dtype


def encode_scores(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The smallest exact encoding of per-example scores (bits, ranks, or float64)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise UncertaintyError(f"per-example scores must be a vector, got shape {v.shape}")
    if np.all((v == 0) | (v == 1)):
        return {"n": int(v.size), "bits": _b64(np.packbits(v.astype(np.uint8)))}
    if np.all(v > 0):
        ranks = np.rint(1.0 / v)
        if np.all((ranks >= 1) & (ranks <= 2**31)) and np.all(1.0 / np.clip(ranks, 1, None) == v):
            data, dtype = _unsigned(ranks.astype(np.int64))
            return {"n": int(v.size), "ranks": data, "dtype": dtype}
    return {"n": int(v.size), "f8": _b64(v.astype("<f8"))}


def decode_scores(enc: Mapping[str, Any]) -> np.ndarray:
    """The float64 vector `encode_scores` encoded."""
    try:
        n = int(enc["n"])
        if "bits" in enc:
            raw = np.frombuffer(base64.b64decode(enc["bits"]), dtype=np.uint8)
            return np.unpackbits(raw)[:n].astype(np.float64)
        if "ranks" in enc:
            ranks = np.frombuffer(base64.b64decode(enc["ranks"]), dtype=enc["dtype"])
            out = 1.0 / ranks.astype(np.float64)
        else:
            out = np.frombuffer(base64.b64decode(enc["f8"]), dtype="<f8").astype(np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise UncertaintyError(f"not an encoded score vector ({exc})") from None
    if out.size != n:
        raise UncertaintyError(f"encoded score vector holds {out.size} values, its header says {n}")
    return out


def encode_clusters(paths: Sequence[str]) -> dict[str, Any]:
    """Each example's source file as an index into the list of distinct files."""
    files: dict[str, int] = {}
    index = np.array([files.setdefault(str(p), len(files)) for p in paths], dtype=np.int64)
    data, dtype = _unsigned(index)
    return {"files": list(files), "index": data, "dtype": dtype}


def decode_clusters(enc: Mapping[str, Any]) -> list[str]:
    """The per-example file paths `encode_clusters` encoded."""
    try:
        files = list(enc["files"])
        index = np.frombuffer(base64.b64decode(enc["index"]), dtype=enc["dtype"])
        return [files[int(i)] for i in index]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UncertaintyError(f"not an encoded cluster list ({exc})") from None


def scores_document(
    tasks: Mapping[str, Mapping[str, Any]], rows: Mapping[str, Mapping[str, Sequence[float]]]
) -> dict[str, Any]:
    """The scores file: `tasks` maps a task to {"clusters": paths, "fingerprint": ...}; `rows` maps a row
    label to {task: per-example scores}. Every row's vector must match its task's example count."""
    out_tasks: dict[str, Any] = {}
    for task, info in tasks.items():
        paths = list(info["clusters"])
        out_tasks[task] = {
            "n": len(paths),
            "fingerprint": info.get("fingerprint"),
            "clusters": encode_clusters(paths),
        }
    out_rows: dict[str, dict[str, Any]] = {}
    for label, per_task in rows.items():
        out_rows[label] = {}
        for task, values in per_task.items():
            if task not in out_tasks or len(values) != out_tasks[task]["n"]:
                raise UncertaintyError(f"row '{label}': {len(values)} scores for task '{task}', which has "
                                       f"{out_tasks.get(task, {}).get('n', 'no')} test examples")  # fmt: skip
            out_rows[label][task] = encode_scores(values)
    return {"format": FORMAT, "version": VERSION, "tasks": out_tasks, "rows": out_rows}


def read_scores_document(
    doc: Mapping[str, Any],
) -> tuple[dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """(task -> per-example files, row -> task -> per-example scores) of a scores file's content."""
    if doc.get("format") != FORMAT:
        raise UncertaintyError(f"not a {FORMAT} document (format {doc.get('format')!r})")
    clusters = {t: decode_clusters(info["clusters"]) for t, info in doc["tasks"].items()}
    rows = {r: {t: decode_scores(e) for t, e in per.items()} for r, per in doc["rows"].items()}
    return clusters, rows


__all__ = [
    "FORMAT", "decode_clusters", "decode_scores", "encode_clusters", "encode_scores", "read_scores_document",
    "scores_document",
]  # fmt: skip

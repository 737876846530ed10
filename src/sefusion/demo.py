"""`sefusion demo`: prepare small checkpoints, merge them with every data-free method, report.

Until the SE study lands this is the README's main job. It writes a small BERT-shaped base (random
initialisation, seeded) and four experts whose task vectors have known supports: two strong tasks, one
task a fifth as strong, and one weak task a twentieth as strong (weak features are what Scaling-Masks
targets). Each expert carries its own classification head, excluded from fusion. Every method merges
them through the same path as `sefusion merge`; bundles are extracted per task with `sefusion extract`.
The report says, for each task, how far the fused model serving it is from the task's expert, relative
to how far the base is:
  dist_t = ||theta_hat_t - theta_t|| / ||theta_0 - theta_t||   (0 = the expert itself, 1 = no closer than the base),
over the merged tensors, and how many bytes serving all tasks needs. A single merged model that carries
the strong tasks' vectors lands far from a weak task's expert (dist > 1): interference, made visible.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ._lazy import torch

log = logging.getLogger("sefusion")

TASKS = {"defect": 1.0, "search": 1.0, "clone": 0.2, "langid": 0.05}
DENSITY = 0.08  # share of entries each fine-tuning moved

RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("linear", "linear", {}),
    ("task_arithmetic", "task_arithmetic", {"lambda": 0.5}),
    ("ties", "ties", {"density": 0.2, "lambda": 1.0}),
    ("ties (model scope)", "ties", {"density": 0.2, "density_scope": "model"}),
    ("dare_linear", "dare_linear", {"density": 0.5, "lambda": 0.5}),
    ("dare_ties", "dare_ties", {"density": 0.5}),
    ("consensus", "consensus", {"k": 2}),
    ("cabs", "cabs", {"n": 8, "m": 32}),
    ("tall_masks", "tall_masks", {"lambdas": 0.4}),
    ("scaling_masks", "scaling_masks", {"lambdas": 0.4}),
]


def _prepare(root: Path) -> dict[str, Path]:
    """Write the base and the experts (once; reused when present)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    paths = {"base": root / "base", **{t: root / f"expert-{t}" for t in TASKS}}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    config = BertConfig(
        vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(paths["base"])
    base_sd = load_file(paths["base"] / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for i, (task, strength) in enumerate(TASKS.items()):
        expert = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 2 + i}))
        sd = {}
        for name, w in base_sd.items():
            if name.startswith("classifier."):
                continue
            support = torch.rand(w.shape, generator=g) < DENSITY
            delta = torch.randn(w.shape, generator=g) * 0.02 * strength * support
            sd[name] = (w + delta).contiguous()
        head = expert.state_dict()
        sd["classifier.weight"] = head["classifier.weight"].contiguous()
        sd["classifier.bias"] = head["classifier.bias"].contiguous()
        expert.config.save_pretrained(paths[task])
        save_file(sd, paths[task] / "model.safetensors", metadata={"format": "pt"})
    return paths


def _distance(theta_hat: dict[str, Any], expert: dict[str, Any], base: dict[str, Any]) -> float:
    num = den = 0.0
    for name, b in base.items():
        num += float((theta_hat[name].double() - expert[name].double()).pow(2).sum())
        den += float((expert[name].double() - b.double()).pow(2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_demo(out: Path, *, quiet: bool = False) -> dict[str, Any]:
    from safetensors.torch import load_file

    from .bundle import Bundle, extract
    from .engine import merge

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = _prepare(out / "checkpoints")
    body = lambda sd: {k: v for k, v in sd.items() if not k.startswith("classifier.")}  # noqa: E731
    base_sd = body(load_file(paths["base"] / "model.safetensors"))
    experts_sd = {t: body(load_file(paths[t] / "model.safetensors")) for t in TASKS}
    separate = sum(_folder_bytes(paths[t]) for t in TASKS)
    rows = []
    for label, method, params in RECIPES:
        recipe = {
            "method": method,
            "base": str(paths["base"]),
            "models": [{"path": str(paths[t]), "name": t} for t in TASKS],
            "params": params,
            "exclude": ["classifier.*"],
        }
        dest = out / "merged" / label.replace(" ", "_").replace("(", "").replace(")", "")
        merge(recipe, dest, overwrite=True, quiet=True)
        dist: dict[str, float] = {}
        if (dest / "bundle.json").is_file():
            b = Bundle(dest)
            storage = b.storage()["bundle_bytes"]
            b.close()
            for t in TASKS:
                task_dir = dest.parent / f"{dest.name}-{t}"
                extract(dest, t, task_dir, overwrite=True, quiet=True)
                dist[t] = _distance(body(load_file(task_dir / "model.safetensors")), experts_sd[t], base_sd)
        else:
            storage = _folder_bytes(dest)
            merged = body(load_file(dest / "model.safetensors"))
            dist = {t: _distance(merged, experts_sd[t], base_sd) for t in TASKS}
        rows.append({"method": label, "params": params, "distance": dist, "storage_bytes": storage})
        if not quiet:
            log.info("  %-20s %s", label, "  ".join(f"{t} {v:.3f}" for t, v in dist.items()))
    report = {
        "tasks": TASKS,
        "separate_bytes": separate,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    table = _table(report)
    (out / "report.md").write_text(
        "# sefusion demo\n\nDistance of the model serving each task from that task's expert, relative to "
        "the base's distance (0 = the expert itself, 1 = no closer than the base), over the merged "
        "tensors.\nTask strengths: " + ", ".join(f"{t} x{s}" for t, s in TASKS.items()) + ".\n\n" + table
    )
    print(table)
    print(f"report: {out / 'report.md'}  ({report['seconds']:.1f} s)")
    return report


def _table(report: dict[str, Any]) -> str:
    tasks = list(report["tasks"])
    head = "| method | " + " | ".join(tasks) + " | mean | bytes to serve all |\n"
    head += "|---" * (len(tasks) + 3) + "|\n"
    lines = [
        f"| individual experts | {' | '.join('0.000' for _ in tasks)} | 0.000 | {report['separate_bytes']:,} |"
    ]
    for r in report["rows"]:
        vals = [r["distance"][t] for t in tasks]
        lines.append(
            f"| {r['method']} | {' | '.join(f'{v:.3f}' for v in vals)} | {sum(vals) / len(vals):.3f} "
            f"| {r['storage_bytes']:,} |"
        )
    return head + "\n".join(lines) + "\n"

"""A causal LM on a generative task's split: greedy replies, every metric per example, 95% intervals.

`sefusion eval MODEL --task NAME` runs it. Intervals are cluster bootstraps over source files (examples of
one file are not independent). For `generate-*` only the problems whose doctests run are generated (a
whole split of bodies would cost as much as HumanEval); every example of the split is scored by the
cheap measure instead: the mean cross-entropy of its target tokens under teacher forcing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SefusionError
from ..tasks.generative import (
    KIND_METRICS,
    STOP_STRINGS,
    GenExample,
    build_generative,
    get_generative,
    per_example_scores,
)
from .uncertainty import interval

# reply lengths: a summary is a sentence, a completed line a line; bodies and fixed functions are longer
MAX_NEW_TOKENS = {"generate": 384, "summarize": 48, "repair": 384, "complete": 64, "translate": 384}
Runner = Callable[..., Sequence[Any]]


@dataclass(frozen=True)
class GenEvalConfig:
    split: str = "test"
    limit: int | None = None  # the first N examples of the split (a quick look, not a result)
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: the task kind's default
    chat: bool = False
    precision: str = "bf16"
    target_loss: bool = True  # generate-*: the teacher-forced target loss of every example
    options: Mapping[str, Any] = field(default_factory=dict)  # task options (doctests_from, ...)

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise SefusionError(f"split must be train, validation or test, got {self.split!r}")
        if self.limit is not None and self.limit <= 0:
            raise SefusionError(f"limit must be positive, got {self.limit}")
        if self.precision not in ("fp32", "bf16"):
            raise SefusionError(f"precision must be fp32 or bf16, got {self.precision!r}")


def task_examples(task: str, cfg: GenEvalConfig, cache: Path | None = None) -> tuple[list[GenExample], dict]:
    """The split's examples (the first `limit`) and the task's provenance (with its fingerprint)."""
    data = build_generative(task, cache=cache, options=cfg.options or None)
    examples = data.split(cfg.split)[: cfg.limit] if cfg.limit else data.split(cfg.split)
    if not examples:
        raise SefusionError(f"task {task}: its {cfg.split} split is empty")
    return examples, {**data.provenance, "fingerprint": data.fingerprint}


def runnable_problems(examples: Sequence[GenExample], runner: Runner | None = None) -> list[int]:
    """Indices of the examples whose doctests their reference body passes here (the scorable problems)."""
    idx = [i for i, ex in enumerate(examples) if "tests" in ex.meta]
    refs = per_example_scores("generate-python", [examples[i] for i in idx],
                              [examples[i].target for i in idx], "pass@1", runner)  # fmt: skip
    return [i for i, s in zip(idx, refs, strict=True) if s == 1.0]


def _load(model: str | Path, precision: str) -> tuple[Any, Any]:
    import torch

    from ..models.causal import load_causal

    return load_causal(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def replies(lm: Any, tok: Any, kind: str, examples: Sequence[GenExample], cfg: GenEvalConfig) -> list[str]:
    from ..models.causal import generate

    return generate(
        lm, tok, [ex.prompt for ex in examples], max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS[kind],
        stop=STOP_STRINGS[kind], batch_size=cfg.batch_size, chat=cfg.chat, desc=f"generating {kind}",
    )  # fmt: skip


def target_losses(
    lm: Any, tok: Any, examples: Sequence[GenExample], chat: bool, max_len: int = 1024
) -> list[float]:
    """Per example: the mean cross-entropy (nats) of its target tokens (and EOS) given its prompt."""
    import torch
    from tqdm.auto import tqdm

    from ..models.causal_train import collate, encode_pair, target_loss

    out = []
    with torch.inference_mode():
        for ex in tqdm(examples, desc="target loss", unit="example"):
            batch = collate([encode_pair(tok, ex.prompt, ex.target, max_len, chat)], tok.pad_token_id)
            batch = {k: v.to(lm.device) for k, v in batch.items()}
            total, n = target_loss(lm, batch)
            out.append(float(total) / max(n, 1))
    return out


def evaluate_task(
    model: str | Path,
    task: str,
    cfg: GenEvalConfig = GenEvalConfig(),  # noqa: B008 - frozen dataclass
    *,
    cache: Path | None = None,
    runner: Runner | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one record per example of the split: index, file, and the reply and metric scores where it was
    generated, its target loss for generate-*; the summary: each metric's mean with its interval, the
    task's provenance and the settings)."""
    examples, provenance = task_examples(task, cfg, cache)
    lm, tok = _load(model, cfg.precision)
    records, metrics = score_examples(lm, tok, task, examples, cfg, runner)
    summary: dict[str, Any] = {
        "model": str(model), "task": task, "split": cfg.split, "examples": len(examples),
        "metrics": {m: metric_summary(m, records) for m in metrics},
        "settings": asdict(cfg) | {"options": dict(cfg.options)}, "task_provenance": provenance,
    }  # fmt: skip
    return records, summary


def score_examples(
    lm: Any, tok: Any, task: str, examples: Sequence[GenExample], cfg: GenEvalConfig,
    runner: Runner | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """(one record per example: index, file, and the reply and metric scores where it was generated, its
    target loss for generate-*; the metrics scored) of a model already in memory."""
    spec, _ = get_generative(task)
    generated = runnable_problems(examples, runner) if spec.kind == "generate" else list(range(len(examples)))
    outs = replies(lm, tok, spec.kind, [examples[i] for i in generated], cfg) if generated else []
    records: list[dict[str, Any]] = [
        {"index": i, "file": ex.meta.get("file", "")} for i, ex in enumerate(examples)
    ]
    for i, out in zip(generated, outs, strict=True):
        records[i]["reply"] = out
    metrics = list(KIND_METRICS[spec.kind])
    for metric in metrics:
        got = (
            per_example_scores(task, [examples[i] for i in generated], outs, metric, runner)
            if generated
            else []
        )
        for i, score in zip(generated, got, strict=True):
            records[i][metric] = score
    if spec.kind == "generate" and cfg.target_loss:
        metrics.append("target_loss")
        for rec, loss in zip(records, target_losses(lm, tok, examples, cfg.chat), strict=True):
            rec["target_loss"] = loss
    return records, metrics


def metric_summary(metric: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of `metric` over the records that carry a finite score, with its cluster interval."""
    keep = [(r[metric], r["file"]) for r in records if not math.isnan(r.get(metric, math.nan))]
    if not keep:
        return {"metric": metric, "n": 0, "mean": math.nan}
    iv = interval([s for s, _ in keep], [f for _, f in keep])
    return {"metric": metric, "n": len(keep), "mean": iv.estimate, "low": iv.low, "high": iv.high}


def summary_line(summary: Mapping[str, Any]) -> str:
    parts = []
    for m in summary["metrics"].values():
        if m["n"]:
            parts.append(f"{m['metric']} {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}] (n={m['n']})")
        else:
            parts.append(f"{m['metric']}: no scorable example")
    return f"{summary['task']} {summary['split']}: " + "; ".join(parts)

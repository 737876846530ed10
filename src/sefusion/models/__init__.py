"""Base-model adapters and fine-tuning: an encoder with mean pooling, per-task heads, experts, evaluation.

* `Encoder` (encoder.py): any Hugging Face encoder folder; ``body_state()`` names tensors exactly as
  the checkpoint file does, so fine-tuned, base and merged bodies share names.
* heads.py: classification heads ``head.{task}.weight/bias``; retrieval by cosine similarity.
* train.py: `finetune` (one task: an expert; several: a multitask model), `head_only` (the `pretrained`
  row), cached by key, resumable, atomic output folders. `TrainConfig` and `BUDGETS` (config.py).
* evaluation.py: `evaluate(body, heads, data, split, spec, base=...)` from in-memory tensors.
* causal.py / causal_train.py: causal code LMs (offline GGUF bases dequantized once, greedy generation
  with per-row stops; LoRA / QLoRA / full fine-tuning on target tokens). Import those modules directly.
* statistics.py: the statistics pass of the data-aware methods (Fisher, Gram matrices, PLeaS features),
  cached like the experts.

The budget and config objects import without torch; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import BUDGETS, Budget, TrainConfig, default_base, default_cache, get_budget

if TYPE_CHECKING:
    from .encoder import Encoder, configure_threads
    from .evaluation import clear_encoders, evaluate, get_encoder, load_model, mrr
    from .heads import HEAD_PREFIX, contrastive_loss, cosine_matrix, head_names, split_state
    from .statistics import expert_statistics, pleas_fuse, statistics_for
    from .train import (
        TrainingStopped,
        base_sha256,
        budget_config,
        finetune,
        head_only,
        read_train_info,
        task_fingerprint,
    )

_LAZY = {
    "Encoder": "encoder",
    "configure_threads": "encoder",
    "clear_encoders": "evaluation",
    "evaluate": "evaluation",
    "get_encoder": "evaluation",
    "load_model": "evaluation",
    "mrr": "evaluation",
    "HEAD_PREFIX": "heads",
    "contrastive_loss": "heads",
    "cosine_matrix": "heads",
    "head_names": "heads",
    "split_state": "heads",
    "expert_statistics": "statistics",
    "pleas_fuse": "statistics",
    "statistics_for": "statistics",
    "TrainingStopped": "train",
    "base_sha256": "train",
    "budget_config": "train",
    "finetune": "train",
    "head_only": "train",
    "read_train_info": "train",
    "task_fingerprint": "train",
}

__all__ = [
    "BUDGETS",
    "HEAD_PREFIX",
    "Budget",
    "Encoder",
    "TrainConfig",
    "TrainingStopped",
    "base_sha256",
    "budget_config",
    "clear_encoders",
    "configure_threads",
    "contrastive_loss",
    "cosine_matrix",
    "default_base",
    "default_cache",
    "evaluate",
    "expert_statistics",
    "finetune",
    "get_budget",
    "get_encoder",
    "head_names",
    "head_only",
    "load_model",
    "mrr",
    "pleas_fuse",
    "read_train_info",
    "split_state",
    "statistics_for",
    "task_fingerprint",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sefusion.models' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value

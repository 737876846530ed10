"""The generative study's scenarios and budgets: LoRA experts of a causal code LM, fused and scored.

- `gen-tasks`: generate, summarize, repair and complete in Python (fusing task kinds of one language);
- `gen-languages`: summarization in the six languages (fusing languages within one task);
- `gen-cross`: kinds and languages mixed.

A budget fixes everything that costs time: LoRA steps per task (a multi-task run takes the sum), the
examples scored (validation: teacher-forced target loss only; test: generated and executed), the fusion
grids (the registry's `quick` or `full` candidates), HumanEval problems, and whether the full fine-tune
row runs. `quick` takes two tasks of each scenario: the whole scenario on the default base within about
20 minutes on 2 cores (an estimate from the measured ~14 s per LoRA step at batch 8 x 256 tokens,
scaled to batch 4; the report states the wall time measured). `full` is sized for at most about 8 hours a
scenario on 2 cores (estimated from ~25 s per LoRA step of 8 at one thread and the base's measured
HumanEval run, 4.4 s a problem: gen-tasks' training ~4 h, HumanEval ~12 min a row); every piece is
resumable and the report states the wall time measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .scenarios import LANGUAGES, StudyError

GEN_TASKS = ("generate-python", "summarize-python", "repair-python", "complete-python")
GEN_LANGUAGES = tuple(f"summarize-{lang}" for lang in LANGUAGES)
GEN_CROSS = ("summarize-go", "complete-java", "repair-javascript", "generate-python")


@dataclass(frozen=True)
class GenBudget:
    """What one run of a generative scenario spends. `steps` are per task; `*_limit` cut a split to its
    first N examples (None: all of it)."""

    name: str
    steps: int
    batch: int
    micro_batch: int
    max_len: int
    r: int = 8
    alpha: int = 16
    grid: str = "quick"  # which of the registry's candidate lists the fusion methods try
    val_limit: int | None = 16
    test_limit: int | None = 32
    humaneval_limit: int | None = None  # None: all 164 problems (gen-tasks only)
    humaneval_tokens: int = 512
    max_new_tokens: int | None = None  # None: each task kind's reply length (gen_eval.MAX_NEW_TOKENS)
    full_steps: int | None = None  # multitask_full's steps per task (None: no full fine-tune row)
    # multitask_full's micro-batch, with activation checkpointing: every weight's gradient and AdamW state
    # in float32 (measured: a full step of the 0.5B base at micro-batch 4 peaked at 21.5 GB, killed for
    # memory beside a 3 GB job on a 24 GB machine)
    full_micro_batch: int = 2
    train_precision: str = "bf16"
    eval_precision: str = "bf16"
    eval_batch: int = 8
    sizes: dict[str, int] = field(default_factory=dict)  # build sizes per split (empty: the task's own)
    # each expert's training pairs that fisher's and regmean's statistics run over (in their rows' params)
    stats_examples: int = 32

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def study_json(self) -> dict[str, Any]:
        """What of the budget a study's records depend on as a whole: not the fields that each record's
        key holds itself (stats_examples, in the params of the rows that read statistics)."""
        return {k: v for k, v in self.to_json().items() if k not in RECORD_KEYED}


RECORD_KEYED = ("stats_examples",)
BUDGETS = {
    # two tasks; 6 LoRA steps of 4 a task (multitask: 12), 2 full fine-tuning steps a task; 6 validation
    # and 8 test examples a task; the registry's quick grids (42 candidates with lora_linear); HumanEval:
    # the first 4 problems, 256 new tokens; Fisher and Gram statistics over 4 training pairs an expert
    "quick": GenBudget(
        "quick", steps=6, batch=4, micro_batch=2, max_len=256, val_limit=6, test_limit=8,
        humaneval_limit=4, humaneval_tokens=256, full_steps=2, eval_batch=8, stats_examples=4,
    ),
    # every task; 50 LoRA steps of 8 a task (400 examples, where the seed study saw experts learn;
    # multitask: 50 x T), 10 full fine-tuning steps a task; 24 validation and 40 test examples a task; the
    # registry's full grids; all 164 HumanEval problems, 256 new tokens (the base's measured run);
    # statistics over 32 training pairs an expert (about 7 minutes an expert on 2 cores)
    "full": GenBudget(
        "full", steps=50, batch=8, micro_batch=4, max_len=512, grid="full", val_limit=24, test_limit=40,
        humaneval_limit=None, humaneval_tokens=256, full_steps=10, stats_examples=32,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class GenScenario:
    name: str
    tasks: tuple[str, ...]
    description: str
    quick_tasks: tuple[str, ...]
    humaneval: bool = False  # HumanEval pass@1 for every row (the held-out benchmark)
    full_row: bool = True  # multitask_full where the budget has it


GEN_SCENARIOS = {
    s.name: s
    for s in (
        GenScenario(
            "gen-tasks", GEN_TASKS, "generate, summarize, repair and complete in Python: fusing task kinds",
            ("summarize-python", "complete-python"), humaneval=True,
        ),
        GenScenario(
            "gen-languages", GEN_LANGUAGES, "summarization in the six languages: fusing languages",
            ("summarize-python", "summarize-go"), full_row=False,
        ),
        GenScenario(
            "gen-cross", GEN_CROSS, "task kinds and languages mixed",
            ("summarize-go", "complete-python"), full_row=False,
        ),
    )
}  # fmt: skip


def get_gen_budget(budget: str | GenBudget) -> GenBudget:
    if isinstance(budget, GenBudget):
        return budget
    if budget not in BUDGETS:
        raise StudyError(f"unknown budget '{budget}'; available: {', '.join(BUDGETS)}")
    return BUDGETS[budget]


def gen_scenario(name: str, budget: GenBudget) -> GenScenario:
    """The scenario `name` with the tasks `budget` runs (quick: its two quick tasks)."""
    if name not in GEN_SCENARIOS:
        raise StudyError(f"unknown generative scenario '{name}'; available: {', '.join(GEN_SCENARIOS)}")
    sc = GEN_SCENARIOS[name]
    return replace(sc, tasks=sc.quick_tasks) if budget.name == "quick" else sc


def is_gen_scenario(name: str) -> bool:
    return name in GEN_SCENARIOS

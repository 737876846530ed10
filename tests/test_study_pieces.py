"""The study's work as pieces on the in-process executor: results.json and scores.json exactly as the runner
wrote them before its work became pieces (tests/fixtures/study_*_results.json, written by that runner),
records written by the driver only, resume without scoring anything twice, and no Ray imported."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from sefusion.study import StudyConfig, gen_pieces, resolve, run_study
from sefusion.study import pieces as study_pieces
from test_study import TASKS, FakeModels, FakeTasks, _config

FIXTURES = Path(__file__).parent / "fixtures"
PAIR_METHODS = ("linear", "ties", "tall_masks", "fisher", "pleas")


def canonical(results: dict, out: Path) -> str:
    """results.json less the base's path and the timings, with scores.json: what two runs must share."""
    kept = {k: v for k, v in results.items() if k not in ("base", "timings_s", "wall_s")}
    kept["scores.json"] = json.loads((out / "scores.json").read_text())
    return json.dumps(kept, sort_keys=True, indent=1) + "\n"


def pair_config(tmp_path: Path, **kw) -> StudyConfig:
    p = tmp_path / "pair.yaml"
    p.write_text("name: pair\ntasks: [alpha-python, beta-python]\n")
    return StudyConfig(
        scenario=resolve(str(p)), out=tmp_path / "report", quiet=True, methods=PAIR_METHODS, **kw
    )


def test_the_toy_study_writes_what_the_runner_wrote_before_pieces(tmp_path):
    results = run_study(_config(tmp_path), models=FakeModels(tmp_path / "models"), tasks_api=FakeTasks())
    assert canonical(results, tmp_path / "report") == (FIXTURES / "study_toy_results.json").read_text()


def test_the_pair_study_with_a_whole_model_method_writes_what_it_wrote_before(tmp_path):
    results = run_study(pair_config(tmp_path), models=FakeModels(tmp_path / "models"), tasks_api=FakeTasks())
    assert canonical(results, tmp_path / "report") == (FIXTURES / "study_pair_results.json").read_text()


def record_keys(models_root: Path) -> list[str]:
    """The keys of the evaluations the study's records hold (FakeModels keeps its cache under its root)."""
    lines = next((models_root / "cache" / "study").glob("toy-*.jsonl")).read_text().splitlines()
    return [json.loads(line)["key"] for line in lines if '"key"' in line]


def test_a_resumed_study_scores_only_what_the_records_lack(tmp_path):
    """Cut after 40 evaluations: the rerun scores each missing (row, params, task, split) once; what is
    lost is what the piece cut short had scored (its records come back with its result)."""
    models = FakeModels(tmp_path / "models")
    real, seen = models.evaluate, {"n": 0}

    def cut(*a, **k):
        seen["n"] += 1
        if seen["n"] > 40:
            raise KeyboardInterrupt
        return real(*a, **k)

    models.evaluate = cut
    with pytest.raises(KeyboardInterrupt):
        run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    models.evaluate = real
    recorded = len(record_keys(tmp_path / "models"))
    assert models.calls["evaluate"] == 40 and 40 - len(TASKS) < recorded <= 40
    results = run_study(_config(tmp_path), models=models, tasks_api=FakeTasks())
    assert canonical(results, tmp_path / "report") == (FIXTURES / "study_toy_results.json").read_text()
    keys = record_keys(tmp_path / "models")
    assert len(keys) == len(set(keys)) == 156  # nothing recorded twice
    assert models.calls["evaluate"] - 40 == len(keys) - recorded  # nothing recorded scored again


def test_the_pieces_and_their_inputs_pickle(tmp_path):
    """What a Ray worker receives: module-level functions by reference, the models API by module name."""
    import sefusion.models

    assert study_pieces.portable(sefusion.models) == "sefusion.models"
    assert study_pieces.models_api("sefusion.models") is sefusion.models
    fns = (
        study_pieces.fine_tune,
        study_pieces.head_only,
        study_pieces.statistics,
        study_pieces.score_validation,
    )
    for fn in (*fns, study_pieces.score_test, gen_pieces.train, gen_pieces.combine, gen_pieces.score):
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_without_ray_the_study_does_not_import_it():
    code = (
        "import sys; from sefusion.study.runner import Study; from sefusion.study import executor;"
        "from sefusion.study.gen_study import GenStudy; from sefusion.study import gen_pieces;"
        "import sefusion.cli; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_experts_statistics_folder_travels_as_its_path(tmp_path):
    """The data-aware methods' input on a Ray worker: the store reopened there from the shared cache."""
    import torch

    from sefusion.stats import Statistics, StatsMeta, open_stats

    fisher = {"w": torch.rand(3, 4)}
    gram = {"w": torch.eye(4, dtype=torch.float64) * 2}
    Statistics(StatsMeta(examples=8, task="t"), fisher=fisher, gram=gram).save(tmp_path / "stats")
    with open_stats(tmp_path / "stats") as store:
        again = pickle.loads(pickle.dumps(store))
        try:
            assert again.path == store.path and again.meta == store.meta
            assert torch.equal(again.fisher("w"), fisher["w"]) and torch.equal(again.gram("w"), gram["w"])
        finally:
            again.close()


class Recording:
    """An in-process executor that records each run's pieces (the study's plan as Ray would see it)."""

    in_process = True

    def __init__(self) -> None:
        from sefusion.study.executor import LocalExecutor

        self.inner, self.runs, self.total = LocalExecutor(quiet=True), [], None

    def session(self, total=None):
        self.total = total
        return self.inner.session(total)

    def run(self, pieces, **kw):
        self.runs.append([(p.key, p.deps) for p in pieces])
        return self.inner.run(pieces, **kw)


def test_training_is_one_run_of_pieces_and_the_bar_total_is_exact(tmp_path):
    """Experts, the frozen base's heads, the multitask model and each expert's statistics are pieces of
    the first run (statistics after their expert); the announced total is every piece of every run."""
    ex = Recording()
    run_study(
        pair_config(tmp_path), models=FakeModels(tmp_path / "models"), tasks_api=FakeTasks(), executor=ex
    )
    first = dict(ex.runs[0])
    tasks = ("alpha-python", "beta-python")
    assert set(first) == {f"{k}/{t}" for k in ("expert", "head", "stats") for t in tasks} | {"multitask"}
    assert all(first[f"stats/{t}"] == (f"expert/{t}",) for t in tasks)
    assert [k for k, _ in ex.runs[0]][-2:] == ["stats/alpha-python", "stats/beta-python"]
    assert ex.total == sum(map(len, ex.runs))

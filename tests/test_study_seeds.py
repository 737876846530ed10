"""Studies over several training seeds (stand-in models and tasks): the data split never moves with the
training seed, one seed is the study as before, per-seed rows differ exactly where randomness enters, the
mean ± sd over seeds is the per-seed rows' (checked against the statistics module), and a rerun with more
seeds trains and scores only the new ones."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics

import pytest
import torch

from sefusion.cli import main
from sefusion.study import StudyError, run_study
from sefusion.study.report import render_markdown, summary_markdown, table_text
from test_study import TASKS, FakeModels, FakeTasks, _config

RANDOM_ROWS = {"dare_ties"}  # the rows whose fusion draws random numbers (its masks)
NEW_KEYS = {"seeds", "data_seed", "per_seed", "comparisons_over_seeds"}


class SeedTasks(FakeTasks):
    """The fake tasks with the split seeded: a different seed gives a different test split (fingerprint)."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] = []

    def build_task(self, name, *, sizes, seed, cache, dirs, options=None):
        self.seeds.append(seed)
        labels = list(self.test_labels)
        random.Random(seed).shuffle(labels)
        return FakeTasks(tuple(labels)).build_task(name, sizes=sizes, seed=seed, cache=cache, dirs=dirs)


class SeedModels(FakeModels):
    """The fake models with training that depends on the seed: seed s != 0 moves every expert (and the
    multitask body) by a seeded perturbation; `trained` lists each model actually trained (not cached)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.trained: list[str] = []

    seed_now = 0
    fresh = False

    def _write(self, name, state, key):
        name, key = (f"{name}-s{self.seed_now}", f"{key}-s{self.seed_now}") if self.seed_now else (name, key)
        self.fresh = not (self.root / "experts" / name).is_dir()
        if self.fresh:
            self.trained.append(name)
        return super()._write(name, state, key)

    def finetune(self, base, datas, specs, cfg, cache, quiet=False):
        self.seed_now = cfg.seed
        folder = super().finetune(base, datas, specs, cfg, cache, quiet)
        if cfg.seed and self.fresh:  # perturb what was trained just now, not a cached model
            from safetensors.torch import load_file, save_file

            state = load_file(str(folder / "model.safetensors"))
            g = torch.Generator().manual_seed(cfg.seed)
            state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith("encoder.") else v
                     for k, v in state.items()}  # fmt: skip
            save_file(state, str(folder / "model.safetensors"))
        return folder

    def head_only(self, base, data, spec, cfg, cache, quiet=False):
        self.seed_now = cfg.seed
        return super().head_only(base, data, spec, cfg, cache, quiet)


def _run(tmp_path, name, models, tasks=None, **kw):
    cfg = dataclasses.replace(_config(tmp_path, **kw), out=tmp_path / name)
    return run_study(cfg, models=models, tasks_api=tasks or FakeTasks())


def _rows(results):
    return {r["method"]: r for r in results["rows"]}


def test_the_data_split_does_not_move_with_the_training_seed(tmp_path):
    tasks = SeedTasks()
    models = SeedModels(tmp_path / "m")
    a = _run(tmp_path, "a", models, tasks, seed=0)
    b = _run(tmp_path, "b", models, tasks, seed=7)
    c = _run(tmp_path, "c", models, tasks, seed=0, data_seed=3)
    prints = [{t: r["data"][t]["fingerprint"] for t in TASKS} for r in (a, b, c)]
    assert set(tasks.seeds) == {0, 3}  # every build used the data seed, never the training seed 7
    assert prints[0] == prints[1]
    assert all(prints[2][t] != prints[0][t] for t in TASKS)  # the data seed does move it
    assert "data_seed" not in a and b["data_seed"] == 0 and c["data_seed"] == 3
    assert a["seed"] == 0 and b["seed"] == 7
    assert _rows(a)["individual"]["test"] != _rows(b)["individual"]["test"]  # the experts did change


def test_one_seed_is_the_study_as_before_and_the_first_of_several(tmp_path):
    """seeds=1 writes no new key; with seeds=2 the first seed's rows, records and scores file are exactly
    the one-seed study's (same cache entries and records, reused)."""
    models = SeedModels(tmp_path / "m")
    one = _run(tmp_path, "one", models)
    assert not NEW_KEYS & set(one) and not any("over_seeds" in r for r in one["rows"])
    records = sorted((tmp_path / "m" / "cache" / "study").iterdir())
    before = records[0].read_bytes()
    two = _run(tmp_path, "two", models, seeds=2)
    assert two["seeds"] == [0, 1] and two["data_seed"] == 0
    first = two["per_seed"][0]
    for r in one["rows"]:
        mine = next(x for x in first["rows"] if x["method"] == r["method"])
        assert {k: r[k] for k in mine} == mine
        top = _rows(two)[r["method"]]
        assert {k: v for k, v in top.items() if k != "over_seeds"} == r
    assert records[0].read_bytes().startswith(before)  # the seed-0 records were read, not rewritten
    assert len(list((tmp_path / "m" / "cache" / "study").iterdir())) == 2  # one more: seed 1's
    assert (tmp_path / "one" / "scores.json").read_bytes() == (tmp_path / "two" / "scores.json").read_bytes()
    assert (tmp_path / "two" / "scores-seed1.json").is_file()


def test_per_seed_rows_differ_exactly_where_randomness_enters(tmp_path):
    """Experts that do not depend on the seed (FakeModels): only the rows that draw random numbers differ."""
    res = _run(tmp_path, "r", FakeModels(tmp_path / "m"), seeds=2)
    s0, s1 = ({r["method"]: r["test"] for r in e["rows"]} for e in res["per_seed"])
    differ = {m for m in s0 if s0[m] != s1[m]}
    assert differ == RANDOM_ROWS
    over = _rows(res)["dare_ties"]["over_seeds"]["test"]
    assert any(over[t]["sd"] > 0 for t in TASKS)
    assert all(_rows(res)["ties"]["over_seeds"]["test"][t]["sd"] == 0 for t in TASKS)


def test_mean_and_sd_over_seeds_are_the_per_seed_rows(tmp_path):
    res = _run(tmp_path, "r", SeedModels(tmp_path / "m"), seeds=3)
    assert [e["seed"] for e in res["per_seed"]] == [0, 1, 2]
    for method, row in _rows(res).items():
        per = [next(r for r in e["rows"] if r["method"] == method) for e in res["per_seed"]]
        for part in ("test", "normalized"):
            for t in TASKS:
                values = [r[part][t] for r in per]
                got = row["over_seeds"][part][t]
                assert got["n"] == 3
                assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
                assert got["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        avg = [r["avg_normalized"] for r in per]
        assert row["over_seeds"]["avg_normalized"]["mean"] == pytest.approx(statistics.fmean(avg), abs=1e-12)
        for t, g in row["over_seeds"]["gain_kept"].items():
            values = [(r["readings"][t].get("gain_kept") or {}).get("estimate") for r in per]
            if g is None:
                assert None in values
            else:
                assert g["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        for t, flags in row["over_seeds"]["flags"].items():
            for f, k in flags.items():
                assert k == sum(f in r["readings"][t]["flags"] for r in per)
    diffs = res["comparisons_over_seeds"][TASKS[0]]["dare_ties - individual"]
    est = [e["comparisons"][TASKS[0]]["dare_ties - individual"]["estimate"] for e in res["per_seed"]]
    assert diffs["mean"] == pytest.approx(statistics.fmean(est), abs=1e-12)
    individual = [e["experts"][TASKS[1]]["test"] for e in res["per_seed"]]
    assert res["experts"][TASKS[1]]["over_seeds"]["test"]["sd"] == pytest.approx(statistics.stdev(individual))


def test_more_seeds_later_train_and_score_only_the_new_seed(tmp_path):
    models = SeedModels(tmp_path / "m")
    _run(tmp_path, "two", models, seeds=2)
    trained_two, evaluated_two = list(models.trained), models.calls["evaluate"]
    study_dir = tmp_path / "m" / "cache" / "study"
    kept = {p.name: p.read_bytes() for p in study_dir.iterdir()}
    assert len(kept) == 2 and not any(n.endswith("-s2") for n in trained_two)
    three = _run(tmp_path, "three", models, seeds=3)
    new = models.trained[len(trained_two) :]
    assert new and all(n.endswith("-s2") for n in new)  # nothing of seeds 0 and 1 trained again
    assert len(new) == len(trained_two) / 2  # one seed's models: experts, heads, multitask
    assert models.calls["evaluate"] - evaluated_two == evaluated_two / 2  # one seed's evaluations
    for name, data in kept.items():  # seeds 0 and 1: records read back, nothing appended
        assert (study_dir / name).read_bytes() == data
    assert three["seeds"] == [0, 1, 2]


def test_records_file_of_several_seeds(tmp_path):
    """--records FILE: the first seed's records in FILE, the others' beside it; a rerun reuses them all."""
    models = SeedModels(tmp_path / "m")
    rec = tmp_path / "carried" / "records.jsonl"
    _run(tmp_path, "a", models, seeds=2, records=rec)
    assert rec.is_file() and (rec.parent / "records-seed1.jsonl").is_file()
    n = models.calls["evaluate"]
    _run(tmp_path, "b", models, seeds=2, records=rec)
    assert models.calls["evaluate"] == n


def test_reports_show_mean_and_sd_with_per_seed_intervals(tmp_path):
    res = _run(tmp_path, "r", SeedModels(tmp_path / "m"), seeds=2)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md == render_markdown(res, ["normalized.png", "magnitudes.png"])
    assert "2 training seeds 0, 1 (data split seed 0)" in md
    assert "mean ± sd over 2 training seeds" in md and "## Per seed" in md
    assert "### Training seed 1 (scores: `scores-seed1.json`)" in md
    row = _rows(res)["task_arithmetic"]
    norm = row["over_seeds"]["normalized"][TASKS[0]]
    assert f"{norm['mean']:.3f} ± {norm['sd']:.3f}" in md
    seed1 = {r["method"]: r for r in res["per_seed"][1]["rows"]}
    iv = seed1["task_arithmetic"]["readings"][TASKS[0]]["normalized"]
    assert f"[{iv['low']:.3f}, {iv['high']:.3f}]" in md  # a per-seed bootstrap interval
    assert "mean over 2 training seeds" in table_text(res)
    summary = summary_markdown([res])
    avg = row["over_seeds"]["avg_normalized"]
    assert f"{avg['mean']:.3f} ± {avg['sd']:.3f}" in summary and "first seed's" in summary
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["per_seed"][1]["seed"] == 1


def test_bad_seeds_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(StudyError, match="seeds must be a whole number of at least 1"):
        _run(tmp_path, "x", FakeModels(tmp_path / "m"), seeds=0)
    assert main(["study", "pair", "--out", str(tmp_path / "o"), "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sefusion: error:") and "at least 1" in err and "Traceback" not in err


def test_cli_seed_flags_reach_the_config(monkeypatch, tmp_path, capsys):
    import sefusion.study as study_pkg

    seen = {}

    def fake_run(cfg):
        seen.update(seed=cfg.seed, seeds=cfg.seeds, data_seed=cfg.data_seed)
        raise study_pkg.StudyError("stop here")

    monkeypatch.setattr(study_pkg, "run_study", fake_run)
    args = ["study", "pair", "--out", str(tmp_path / "o")]
    assert main([*args, "--seeds", "3", "--seed", "4", "--data-seed", "2"]) == 2
    assert seen == {"seed": 4, "seeds": 3, "data_seed": 2}
    assert main(args) == 2 and seen == {"seed": 0, "seeds": 1, "data_seed": 0}
    capsys.readouterr()

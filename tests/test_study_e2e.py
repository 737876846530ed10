"""The whole study, for real, on a tiny model: real tasks from the Python standard library, a 2-layer BERT
with all-MiniLM-L6-v2's tokenizer, experts fine-tuned, every method fused, selected on validation,
scored on test, report written. Small enough for CI (well under two minutes)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_base
from sefusion.cli import main
from sefusion.study import ROWS, StudyConfig, run_study
from sefusion.study.scenarios import Scenario

TASKS = ("consistency-python", "defect-python", "search-python")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from sefusion.models import Budget

    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEFUSION_CACHE", str(root / "cache"))
    mp.setenv("SEFUSION_THREADS", "1")  # tiny models: a second thread only adds contention
    budget = Budget(name="tiny", steps=6, batch_size=8, max_length=64, lr=1e-3, n_train=48, n_validation=16,
                    n_test=16, pool=16)  # fmt: skip
    cfg = StudyConfig(
        scenario=Scenario("tiny", TASKS, "a tiny end-to-end study"),
        out=root / "report",
        budget=budget,
        base=tiny_base(root / "base"),
        cache=root / "cache",
        quiet=True,
    )
    results = run_study(cfg)
    yield results, cfg, root
    mp.undo()


def test_every_row_on_real_tasks(study):
    results, cfg, _ = study
    assert [r["method"] for r in results["rows"]] == [m for m in ROWS if m != "pleas"]
    assert results["tasks"] == list(TASKS)
    for t in TASKS:
        e = results["experts"][t]
        assert e["metric"] == ("mrr" if t.startswith("search") else "accuracy")
        assert 0 < e["chance"] < 1
        assert results["data"][t]["sizes"]["test"] > 0
        assert e["train"]["base_sha256"] == results["base_sha256"]  # one hash of the base everywhere
    for r in results["rows"]:
        for t in TASKS:
            assert 0.0 <= r["test"][t] <= 1.0
    report = (cfg.out / "report.md").read_text()
    assert "Normalized test scores" in report and "Corpus provenance" in report
    on_disk = json.loads((cfg.out / "results.json").read_text())
    assert on_disk["scenario"] == "tiny" and len(on_disk["rows"]) == len(ROWS) - 1
    assert {"normalized.png", "magnitudes.png"} <= {p.name for p in cfg.out.iterdir()}


def test_magnitudes_cover_every_layer(study):
    results, _, _ = study
    mags = results["magnitudes"]
    assert mags["layers"][:3] == ["embeddings", "layer 0", "layer 1"]
    for t in TASKS:
        assert mags["tasks"][t]["norm"] > 0  # every expert moved


def test_second_run_is_all_cache(study, tmp_path):
    """Experts and every evaluation come from the cache: nothing is trained or scored again."""
    results, cfg, root = study
    import sefusion.models as models

    calls = {"n": 0}
    real = models.evaluate

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    class Spy:
        def __getattr__(self, name):
            return counting if name == "evaluate" else getattr(models, name)

    again = run_study(
        StudyConfig(scenario=cfg.scenario, out=tmp_path / "again", budget=cfg.budget, base=cfg.base,
                    cache=cfg.cache, quiet=True),
        models=Spy(),
    )  # fmt: skip
    assert calls["n"] == 0
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in results["rows"]]


def test_cli_study_refuses_an_existing_folder_and_a_bad_scenario(study, capsys):
    _, cfg, _ = study
    assert main(["study", "same-category", "--out", str(cfg.out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["study", "no-such-scenario", "--out", str(cfg.out.parent / "x")]) == 2
    assert "available: languages, same-category, cross-category" in capsys.readouterr().err


def test_cli_study_eval_precision_flag(monkeypatch, tmp_path, capsys):
    """--eval-precision reaches the StudyConfig; a value other than fp32/bf16 is refused by argparse."""
    import sefusion.study as study_pkg

    seen = {}

    def fake_run(cfg):
        seen["precision"] = cfg.eval_precision
        raise study_pkg.StudyError("stop here")

    monkeypatch.setattr(study_pkg, "run_study", fake_run)
    assert main(["study", "pair", "--out", str(tmp_path / "o"), "--eval-precision", "bf16"]) == 2
    assert seen["precision"] == "bf16" and "stop here" in capsys.readouterr().err
    assert main(["study", "pair", "--out", str(tmp_path / "o")]) == 2
    assert seen["precision"] is None  # the budget's own
    with pytest.raises(SystemExit) as exc:
        main(["study", "pair", "--out", str(tmp_path / "o"), "--eval-precision", "fp16"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_intervals_and_gain_kept_recompute_from_scores_json(study):
    """results.json's readings on real tasks agree with an independent recomputation from scores.json:
    every row's interval (cluster bootstrap over source files), gain kept by hand, the differences."""
    from sefusion.study import gains, scores
    from sefusion.study import uncertainty as U

    results, cfg, _ = study
    doc = json.loads((cfg.out / "scores.json").read_text())
    clusters, per = scores.read_scores_document(doc)
    assert (
        "ranks" in doc["rows"]["individual"]["search-python"]
        or "bits" in doc["rows"]["individual"]["search-python"]
    )
    rows = {r["method"]: r for r in results["rows"]}
    for t in TASKS:
        facts = results["data"][t]
        assert facts["fingerprint"] == doc["tasks"][t]["fingerprint"] and len(facts["fingerprint"]) == 64
        assert facts["test_files"] == len(set(clusters[t])) and facts["test_examples"] == len(clusters[t])
        assert facts["baseline"]["name"] == (
            "name match + TF-IDF" if t.startswith("search") else "majority class"
        )
        pre, ind = rows["pretrained"]["test"][t], rows["individual"]["test"][t]
        for m, r in rows.items():
            assert per[m][t].mean() == pytest.approx(r["test"][t], abs=1e-9)
            assert r["readings"][t]["interval"] == U.interval(per[m][t], clusters[t]).as_dict()
            if m in ("pretrained", "individual"):
                continue
            by_hand = gains.gain_kept(r["test"][t], ind, pre)
            g = r["readings"][t]["gain_kept"]
            assert (g is None) == (by_hand is None)
            if g is not None:
                assert g["estimate"] == pytest.approx(by_hand, abs=1e-9)
        d = U.paired_difference(per["ties"][t], per["individual"][t], clusters[t])
        assert results["comparisons"][t]["ties - individual"] == {**d.as_dict(), "significant": d.significant}


@pytest.mark.slow
def test_seeds_on_real_tasks_reuse_the_seeds_already_run(study, tmp_path):
    """Real fine-tuning, --seeds 2 then 3: the first seed is the module's one-seed study, scored from its
    records; seed 1's experts and rows differ on the same data split; seeds 3 trains and scores seed 2 only."""
    import dataclasses

    import sefusion.models as models

    results, cfg, root = study
    calls = {"n": 0}

    class Spy:
        def __getattr__(self, name):
            if name != "evaluate":
                return getattr(models, name)

            def counting(*a, **k):
                calls["n"] += 1
                return models.evaluate(*a, **k)

            return counting

    def trained() -> set:
        return {p.parent for p in cfg.cache.rglob("train.json")}

    two = run_study(dataclasses.replace(cfg, out=tmp_path / "two", seeds=2), models=Spy())
    assert two["per_seed"][0]["rows"][1]["test"] == results["rows"][1]["test"]  # seed 0: as before
    assert {t: d["fingerprint"] for t, d in two["data"].items()} == {
        t: d["fingerprint"] for t, d in results["data"].items()
    }
    s0, s1 = ({r["method"]: r["test"] for r in e["rows"]} for e in two["per_seed"])
    assert s0["individual"] != s1["individual"] and s0["dare_ties"] != s1["dare_ties"]
    one_seed, before = calls["n"], trained()
    three = run_study(dataclasses.replace(cfg, out=tmp_path / "three", seeds=3), models=Spy())
    assert calls["n"] == 2 * one_seed  # seed 2's evaluations only (seeds 0 and 1 from their records)
    assert len(trained() - before) == 3 + 2 + 1  # seed 2's 3 experts, 2 classification heads, multitask
    assert three["per_seed"][1]["rows"] == two["per_seed"][1]["rows"]

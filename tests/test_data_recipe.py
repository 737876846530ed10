"""Data-aware methods from recipes: `data:` / `examples:` / `stats:` in the schema, the engine feeding each
expert's statistics tensor by tensor, and `sefusion merge` end to end.

References are float64 numpy written here from the papers' formulas (Fisher-weighted average; RegMean's
normal equations solved with numpy.linalg.solve), independent of the library's code path.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sefusion.engine.stream as engine
from conftest import leftovers, read_folder, write_folder, write_recipe
from sefusion import merge, merge_tensors
from sefusion.cli import main
from sefusion.engine import merge_tensors_with_stats
from sefusion.errors import RecipeError
from sefusion.recipe import load_recipe
from sefusion.stats import Statistics, StatisticsError, StatsMeta, open_stats

SHAPES = {
    "l0.weight": (6, 4),
    "l0.bias": (6,),
    "l1.weight": (3, 6),
    "norm.weight": (3,),
    "norm.bias": (3,),
    "classifier.weight": (2, 3),  # excluded: copied from the base, and left out of Fisher's norm
}
LINEAR = {"l0.weight", "l1.weight"}
MERGED = [n for n in SHAPES if not n.startswith("classifier")]
TASKS = ["defect-python", "clone-python"]
WEIGHTS = [0.7, 1.3]
EXAMPLES = 32


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def statistics(seed: int, examples: int = EXAMPLES, *, drop: tuple[str, ...] = (), grams=None) -> Statistics:
    """Fisher for every tensor (classifier too: it must not count in the norm), Gram for the linear weights."""
    g = torch.Generator().manual_seed(100 + seed)
    fisher = {k: torch.rand(s, generator=g) * 2 + 0.01 for k, s in SHAPES.items() if k not in drop}
    if grams is None:
        grams = {}
        for k in LINEAR:
            x = torch.randn(40, SHAPES[k][1], generator=g, dtype=torch.float64)  # (rows, in)
            grams[k] = x.T @ x
    return Statistics(StatsMeta(examples=examples, task=TASKS[seed % 2]), fisher=fisher, gram=grams)


@pytest.fixture
def env(tmp_path):
    """Base + two experts on disk, their tensors, and each expert's statistics in memory."""
    base = tensors(0)
    experts = [tensors(1), tensors(2)]
    paths = {"base": write_folder(tmp_path / "base", base)}
    for i, ex in enumerate(experts):
        paths[f"e{i}"] = write_folder(tmp_path / f"e{i}", ex)
    stats = [statistics(0), statistics(1)]
    return {"root": tmp_path, "paths": paths, "base": base, "experts": experts, "stats": stats}


def recipe(env, method: str, **extra) -> dict:
    models = [
        {"path": str(env["paths"][f"e{i}"]), "name": TASKS[i], "weight": WEIGHTS[i], **extra.pop(f"m{i}", {})}
        for i in range(2)
    ]
    return {"method": method, "base": str(env["paths"]["base"]), "models": models,
            "exclude": ["classifier.*"], **extra}  # fmt: skip


# --------------------------------------------------------------------------- references (float64 numpy)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def fisher_ref(experts, stats, weights, floor=1e-6) -> dict[str, np.ndarray]:
    """theta = sum_t c_t max(F_t, floor) theta_t / sum_t c_t max(F_t, floor), c_t = w_t / ||F_t||, the norm
    over the merged tensors only."""
    norms = [np.sqrt(sum((np64(s.fisher(n)) ** 2).sum() for n in MERGED)) for s in stats]
    out = {}
    for n in MERGED:
        fs = [
            np.maximum(np64(s.fisher(n)), floor) * (w / z)
            for s, w, z in zip(stats, weights, norms, strict=True)
        ]
        out[n] = sum(f * np64(e[n]) for f, e in zip(fs, experts, strict=True)) / sum(fs)
    return out


def regmean_ref(experts, stats, weights, alpha=0.95) -> dict[str, np.ndarray]:
    """W = (sum_t w_t G~_t)^-1 sum_t w_t G~_t W_t^T, G~ = alpha G + (1 - alpha) diag(G); else weighted mean."""
    out = {}
    for n in MERGED:
        if n in LINEAR:
            gs = []
            for s, w in zip(stats, weights, strict=True):
                g = np64(s.gram(n))
                gs.append(w * (alpha * g + (1 - alpha) * np.diag(np.diag(g))))
            rhs = sum(g @ np64(e[n]).T for g, e in zip(gs, experts, strict=True))
            out[n] = np.linalg.solve(sum(gs), rhs).T
        else:
            out[n] = sum(w * np64(e[n]) for w, e in zip(weights, experts, strict=True)) / sum(weights)
    return out


REFS = {"fisher": fisher_ref, "regmean": regmean_ref}


# --------------------------------------------------------------------------- recipe


def test_recipe_accepts_data_examples_and_stats_and_round_trips(tmp_path):
    folder = statistics(1).save(tmp_path / "stats-b")
    r = load_recipe(
        {
            "method": "fisher",
            "models": [
                {"path": "a", "data": "defect-python", "examples": 64},
                {"path": "b", "stats": str(folder)},
            ],
        }
    )
    assert (
        r.models[0].data == "defect-python"
        and r.models[0].examples == 64
        and r.models[1].stats == str(folder)
    )
    assert r.entry_examples(0) == 64 and r.entry_examples(1) is None
    again = load_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert "data: defect-python" in r.to_yaml() and "examples: 64" in r.to_yaml()


def test_relative_data_and_stats_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    statistics(1).save(tmp_path / "stats" / "b")
    path = write_recipe(
        tmp_path / "r.yaml",
        method="regmean",
        models=[{"path": "a", "data": "data/a.jsonl"}, {"path": "b", "stats": "stats/b"},
                {"path": "c", "data": "search-go"}],
    )  # fmt: skip
    r = load_recipe(path)
    assert r.models[0].data == str(tmp_path / "data" / "a.jsonl")
    assert r.models[1].stats == str(tmp_path / "stats" / "b")
    assert r.models[2].data == "search-go"  # a task name stays a name


def refused(data: dict, *words: str, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(data, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_unknown_task_is_refused_with_the_list():
    refused(
        {"method": "fisher", "models": [{"path": "a", "data": "defekt-python"}, {"path": "b", "stats": "."}]},
        "models[0]", "defekt-python", "defect-python", "search-go", "clone-java",
    )  # fmt: skip


def test_missing_data_is_refused_naming_the_model():
    for method in ("fisher", "regmean", "pleas"):
        msg = refused(
            {"method": method, "models": [{"path": "x/a", "data": "defect-python"}, {"path": "x/b"}]},
            "model 'b'", "needs `data:`", f"method {method}",
        )  # fmt: skip
        assert "model 'a'" not in msg
    # statistics handed to the engine directly: not required in the recipe
    load_recipe({"method": "fisher", "models": [{"path": "a"}, {"path": "b"}]}, require_data=False)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"examples": 0}, ["models[0].examples", "greater than or equal to 1"]),
        ({"examples": 2.5}, ["models[0].examples"]),
        ({"examples": True}, ["models[0].examples"]),
        ({"data": "missing.jsonl"}, ["data file", "missing.jsonl", "does not exist"]),
        ({"stats": "no-such-folder"}, ["statistics folder", "no-such-folder", "does not exist"]),
        ({"data": "defect-python", "stats": "."}, ["both `data:` and `stats:`"]),
        ({"data": "defect-python", "examples": 8, "params": {"examples": 16}}, ["`examples: 8`", "give one"]),
        ({"data": "defect"}, ["needs a language", "defect-python"]),
    ],
)
def test_bad_data_entries_are_refused(entry, words):
    refused({"method": "fisher", "models": [{"path": "a", **entry}, {"path": "b", "stats": "."}]}, *words)


def test_a_data_file_must_be_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("x\n")
    refused({"method": "fisher", "models": [{"path": "a", "data": str(tmp_path / "d.csv")}]}, "not a .jsonl")


def test_pleas_needs_data_not_stats():
    refused({"method": "pleas", "models": [{"path": "a", "stats": "."}, {"path": "b", "data": "clone-python"}]},
            "models[0]", "replace `stats:` by `data:`")  # fmt: skip


def test_data_on_a_data_free_method_is_a_note():
    r = load_recipe({"method": "linear", "models": [{"path": "a", "data": "defect-python", "examples": 8},
                                                    {"path": "b"}]})  # fmt: skip
    assert any("models[0]" in n and "`data:`" in n and "unused" in n for n in r.notes)


# --------------------------------------------------------------------------- engine


def merged_output(env, method, out_name="out", **kw) -> dict[str, torch.Tensor]:
    out = env["root"] / out_name
    merge(recipe(env, method, **kw.pop("recipe", {})), out, stats=kw.pop("stats", env["stats"]), **kw)
    return read_folder(out)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_engine_equals_in_memory_path_and_float64_reference(env, method, monkeypatch):
    got = merged_output(env, method)
    experts = [{n: ex[n] for n in MERGED} for ex in env["experts"]]
    mem = merge_tensors_with_stats(
        method, experts, env["stats"], WEIGHTS, task_names=TASKS, examples=EXAMPLES
    )
    ref = REFS[method](env["experts"], env["stats"], WEIGHTS)
    assert set(got) == set(SHAPES)
    torch.testing.assert_close(got["classifier.weight"], env["base"]["classifier.weight"], rtol=0, atol=0)
    for n in MERGED:
        torch.testing.assert_close(got[n], mem[n], rtol=1e-6, atol=1e-7, msg=n)
        np.testing.assert_allclose(np64(got[n]), ref[n], rtol=2e-5, atol=1e-6, err_msg=n)
    # merge_tensors takes the same statistics; tiny chunks do not split a data-aware method's tensors
    same = merge_tensors(
        method, None, experts, WEIGHTS, task_names=TASKS, stats=env["stats"], examples=EXAMPLES
    )
    monkeypatch.setattr(engine, "CHUNK", 8)
    chunked = merged_output(env, method, "chunked")
    for n in MERGED:
        torch.testing.assert_close(same[n], mem[n], rtol=0, atol=0)
        torch.testing.assert_close(chunked[n], got[n], rtol=0, atol=0)


def test_stores_on_disk_give_the_same_merge(env):
    folders = [s.save(env["root"] / f"stats{i}") for i, s in enumerate(env["stats"])]
    stores = [open_stats(f) for f in folders]
    try:
        from_disk = merged_output(env, "regmean", "disk", stats=stores)
    finally:
        for s in stores:
            s.close()
    in_memory = merged_output(env, "regmean")
    for n in MERGED:
        torch.testing.assert_close(from_disk[n], in_memory[n], rtol=0, atol=0)
    # the recipe's own `stats:` folders, opened by the engine itself
    models = {f"m{i}": {"stats": str(f)} for i, f in enumerate(folders)}
    out = env["root"] / "by-recipe"
    merge(recipe(env, "regmean", **models), out)
    for n in MERGED:
        torch.testing.assert_close(read_folder(out)[n], in_memory[n], rtol=0, atol=0)


def test_missing_statistics_name_the_expert(env):
    with pytest.raises(StatisticsError, match="'clone-python'"):
        merged_output(env, "fisher", stats=[env["stats"][0], None])
    lacking = [env["stats"][0], statistics(1, drop=("l0.bias",))]
    with pytest.raises(StatisticsError, match=r"expert 'clone-python'.*no Fisher for tensor 'l0.bias'"):
        merged_output(env, "fisher", stats=lacking)
    other_model = [env["stats"][0], statistics(1, grams={"bert.dense.weight": torch.eye(3)})]
    with pytest.raises(StatisticsError, match=r"expert 'clone-python'.*none of the merged tensors"):
        merged_output(env, "regmean", stats=other_model)
    with pytest.raises(StatisticsError, match="for 1 experts"):
        merged_output(env, "regmean", stats=env["stats"][:1])
    with pytest.raises(StatisticsError, match=r"expert 'defect-python'.*not computed here"):
        merge(recipe(env, "fisher", m0={"data": "defect-python"}, m1={"stats": "."}), env["root"] / "x")
    assert not (env["root"] / "out").exists() and leftovers(env["root"]) == []


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_entries_are_computed_over_the_merged_tensors_without_the_excluded(env, method):
    """compute_stats(entry, examples, kinds, names) gets the plan's merged tensors: not `classifier.*`,
    which the recipe excludes; what it returns is what the merge reads (the same as passing stats=)."""
    folders = [s.save(env["root"] / f"st{i}") for i, s in enumerate(env["stats"])]
    calls = []

    def compute(entry, examples, kinds, names):
        calls.append((entry.data, examples, sorted(kinds), list(names)))
        return folders[TASKS.index(entry.data)]

    entries = {f"m{i}": {"data": TASKS[i], "examples": EXAMPLES} for i in range(2)}
    out = env["root"] / "computed"
    merge(recipe(env, method, **entries), out, compute_stats=compute)
    kind = ["fisher"] if method == "fisher" else ["gram"]
    assert calls == [(t, EXAMPLES, kind, sorted(MERGED)) for t in TASKS]
    given = merged_output(env, method, "given")
    for n in SHAPES:
        torch.testing.assert_close(read_folder(out)[n], given[n], rtol=0, atol=0)


def test_examples_are_checked_where_the_recipe_sets_them(env):
    # none set: the statistics' own count (32) is used as is
    merged_output(env, "fisher", "ok")
    with pytest.raises(StatisticsError, match=r"'defect-python'.*32 available, 64 asked"):
        merged_output(env, "fisher", "bad", recipe={"m0": {"examples": 64}})
    with pytest.raises(StatisticsError, match="too few examples"):
        merged_output(env, "regmean", "bad", recipe={"params": {"examples": 256}})


def test_pleas_is_refused_by_the_tensor_merge(env):
    with pytest.raises(RecipeError, match="runs in the study"):
        merge(recipe(env, "pleas"), env["root"] / "p", stats=env["stats"])


# --------------------------------------------------------------------------- CLI


def cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_cli_merges_with_stats_folders(env, capsys):
    root = env["root"]
    for i, s in enumerate(env["stats"]):
        s.save(root / "stats" / TASKS[i])
    models = [{"path": f"e{i}", "name": TASKS[i], "weight": WEIGHTS[i], "stats": f"stats/{TASKS[i]}"}
              for i in range(2)]  # fmt: skip
    path = write_recipe(
        root / "r.yaml", method="fisher", base="base", models=models, exclude=["classifier.*"]
    )
    code, err = cli(["merge", str(path), str(root / "out"), "-q"], capsys)
    assert code == 0, err
    got = read_folder(root / "out")
    ref = fisher_ref(env["experts"], env["stats"], WEIGHTS)
    for n in MERGED:
        np.testing.assert_allclose(np64(got[n]), ref[n], rtol=2e-5, atol=1e-6, err_msg=n)
    assert "stats: " in (root / "out" / "README.md").read_text()  # the recipe in the model card


@pytest.mark.parametrize(
    ("models", "words"),
    [
        ([{"stats": "nowhere"}, {"stats": "s1"}], ["statistics folder", "nowhere", "does not exist"]),
        ([{"data": "defect-pyton"}, {"stats": "s1"}], ["unknown task 'defect-pyton'", "defect-python"]),
        ([{}, {"stats": "s1"}], ["model 'e0'", "needs `data:`", "fisher"]),
        ([{"stats": "bad"}, {"stats": "s1"}], ["stats.json is missing", "expert 'e0'"]),
    ],
)
def test_cli_bad_statistics_input_is_one_line(env, capsys, models, words):
    root = env["root"]
    env["stats"][1].save(root / "s1")
    (root / "bad").mkdir()
    entries = [{"path": f"e{i}", **m} for i, m in enumerate(models)]
    path = write_recipe(
        root / "r.yaml", method="fisher", base="base", models=entries, exclude=["classifier.*"]
    )
    code, err = cli(["merge", str(path), str(root / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sefusion: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not (root / "out").exists() and leftovers(root) == []


def test_cli_pleas_says_where_it_runs(env, capsys):
    entries = [{"path": f"e{i}", "data": TASKS[i]} for i in range(2)]
    path = write_recipe(env["root"] / "r.yaml", method="pleas", models=entries)
    code, err = cli(["merge", str(path), str(env["root"] / "out")], capsys)
    assert code == 2 and "pleas runs in the study" in err and len(err.strip().splitlines()) == 1


def test_cli_computes_statistics_of_data_entries(env, capsys, monkeypatch):
    """`data:` goes through sefusion.models.statistics.statistics_for (replaced here by a stand-in that
    returns saved folders), with the model's examples, the method's kinds and the recipe's base."""
    root = env["root"]
    folders = {TASKS[i]: s.save(root / "cache" / TASKS[i]) for i, s in enumerate(env["stats"])}
    calls = []

    def statistics_for(expert, *, data, examples, kinds, base, cache, quiet):
        calls.append((Path(expert).name, data, examples, sorted(kinds), base, cache, quiet))
        return folders[data]

    fake = types.ModuleType("sefusion.models.statistics")
    fake.statistics_for = statistics_for
    monkeypatch.setitem(sys.modules, "sefusion.models.statistics", fake)
    models = [{"path": f"e{i}", "name": TASKS[i], "weight": WEIGHTS[i], "data": TASKS[i], "examples": EXAMPLES}
              for i in range(2)]  # fmt: skip
    path = write_recipe(
        root / "r.yaml", method="regmean", base="base", models=models, exclude=["classifier.*"]
    )
    code, err = cli(["merge", str(path), str(root / "out"), "-q"], capsys)
    assert code == 0, err
    base = str(env["paths"]["base"])
    assert calls == [("e0", TASKS[0], EXAMPLES, ["gram"], base, None, True),
                     ("e1", TASKS[1], EXAMPLES, ["gram"], base, None, True)]  # fmt: skip
    ref = regmean_ref(env["experts"], env["stats"], WEIGHTS)
    got = read_folder(root / "out")
    for n in MERGED:
        np.testing.assert_allclose(np64(got[n]), ref[n], rtol=2e-5, atol=1e-6, err_msg=n)
    # an existing OUT is refused before any statistics are computed
    calls.clear()
    code, err = cli(["merge", str(path), str(root / "out")], capsys)
    assert code == 2 and "exists" in err and calls == []


def test_the_real_statistics_pass_takes_the_cli_arguments():
    from sefusion.models.statistics import statistics_for

    inspect.signature(statistics_for).bind(
        "expert",
        data="defect-python",
        examples=8,
        kinds=frozenset({"gram"}),
        base=None,
        cache=None,
        quiet=True,
    )

"""The generative fusion study (sefusion.study.gen_study) end to end on a tiny Llama-shaped LM and two
synthetic tasks: every row, selection on validation only, a rerun that trains and scores nothing,
results.json recomputed from the records, LoRA `cat` = the exact sum of the updates, bad input refused."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sefusion.cli import main
from sefusion.errors import CheckpointError
from sefusion.io.lora import dense_updates
from sefusion.study import scores
from sefusion.study.gen_lora import combine
from sefusion.study.gen_report import PLOTS, _experts_table
from sefusion.study.gen_scenarios import GEN_SCENARIOS, GenBudget
from sefusion.study.gen_study import (
    GenStudy,
    GenStudyConfig,
    gen_pairs,
    humaneval_pairs,
    select_by_loss,
    study_methods,
)
from sefusion.study.runner import EvalRecords
from sefusion.tasks.generative import GenExample, GenSplits
from test_generative import problems  # noqa: F401 - a fixture
from test_study_pieces import Recording
from tiny_causal import make_causal, pairs, random_adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TASKS = ("summarize-python", "generate-python")
TASKS_KEYS = tuple(f"expert/{t}" for t in TASKS)
TINY = GenBudget(
    "tiny", steps=2, batch=2, micro_batch=1, max_len=64, grid="tiny", val_limit=3, test_limit=4,
    humaneval_limit=2, humaneval_tokens=4, max_new_tokens=4, full_steps=1, train_precision="fp32",
    eval_precision="fp32", eval_batch=4, stats_examples=3,
)  # fmt: skip
RUNS = Recording()  # the in-process executor of the `study` fixture, recording its runs of pieces
PROBLEMS: list[GenExample] = []  # generate-python's examples (test_generative's module), set by `study`


def synthetic(task: str, test_offset: int = 0) -> GenSplits:
    """summarize: reversed words (24 train, 6 validation, 6 test examples over 3 files a split);
    generate: doctest problems (runnable, failing their own doctest, without doctests), executed."""
    if task == "generate-python":
        k = test_offset % len(PROBLEMS)
        test = PROBLEMS[k:] + PROBLEMS[:k]
        return GenSplits(task, PROBLEMS * 4, PROBLEMS[:3], test, {"task": task}, f"{task}-{test_offset}")
    made = pairs(36 + test_offset, seed=0)

    def ex(i: int, p: str, t: str) -> GenExample:
        return GenExample(f"{p} sum", t, {"file": f"f{i % 3}.py", "language": "python"})

    train, val = made[:24], made[24:30]
    test = made[30 + test_offset : 36 + test_offset]
    splits = {
        s: [ex(i, *x) for i, x in enumerate(v)]
        for s, v in (("train", train), ("validation", val), ("test", test))
    }
    return GenSplits(task, **splits, provenance={"task": task}, fingerprint=f"{task}-{test_offset}")


def builder(task, budget, seed, cache, dirs):
    return synthetic(task)


def config(base: Path, out: Path, cache: Path, **kw) -> GenStudyConfig:
    return GenStudyConfig("gen-tasks", out, budget=TINY, base=base, cache=cache, tasks=TASKS, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_causal(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def study(tiny, problems, tmp_path_factory):  # noqa: F811
    PROBLEMS[:] = [problems[k] for k in ("area", "wrong", "plain", "double", "twice")]
    root = tmp_path_factory.mktemp("gen")
    cfg = config(tiny, root / "out", root / "cache")
    with one_thread():  # the floats of the fixture (another thread count may round differently)
        results = GenStudy(cfg, builder=builder, executor=RUNS).run()
    return cfg, results


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _row(results, method):
    return next(r for r in results["rows"] if r["method"] == method)


def test_every_row_and_the_report(study):
    cfg, results = study
    methods, skipped = study_methods()
    want = [
        "pretrained",
        "individual",
        *methods,
        "lora_cat",
        "lora_linear",
        "multitask_lora",
        "multitask_full",
    ]
    assert [r["method"] for r in results["rows"]] == want
    assert {"fisher", "regmean"} <= set(methods)  # their statistics: each expert's, on its training pairs
    assert set(skipped) == {"pleas"} and set(skipped) <= set(results["skipped"])
    for row in ("fisher", "regmean"):
        assert _row(results, row)["params"]["examples"] == TINY.stats_examples
    assert "CUDA" in results["skipped"]["multitask_qlora"]
    # generate-python: of the first 4 test problems (the cut), `wrong` fails its own doctest and `plain` has
    # none; `twice`, beyond the cut, runs and is kept
    assert results["experts"]["generate-python"]["n_test"] == 3
    assert results["data"]["generate-python"]["scored"]["test"] == 5
    for row in results["rows"]:
        assert set(row["test"]) == set(TASKS) and row["humaneval"]["n"] == 2
        assert row["quality"]["generate-python"]["functions"] == 3
        assert row["test"]["generate-python"] in (0, 1 / 3, 2 / 3, 1)
        assert "interval" in row["humaneval"] and set(row["readings"]) == set(TASKS)
        if row["method"] in methods or row["method"] in ("lora_cat", "lora_linear"):
            assert row["grid"] and row["selected_on"].startswith("validation")
    for name in ("results.json", "report.md", "scores.json", "records.jsonl", "gen-study.json"):
        assert (cfg.out / name).is_file()
    for t in (*TASKS, "multitask_lora"):
        assert (cfg.out / "adapters" / t / "adapter_model.safetensors").is_file()
        assert not (cfg.out / "adapters" / t / "tokenizer.json").exists()
    assert sorted(p.name for p in (cfg.out / "adapters").iterdir()) == sorted([*TASKS, "multitask_lora"])
    report = (cfg.out / "report.md").read_text()
    assert "## HumanEval pass@1" in report and "## Serving every task" in report and "lora_cat" in report
    assert "## Experts against the base" in report and "## Paired differences" in report
    for png in PLOTS:  # drawn, and shown by the report
        assert (cfg.out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{png}]({png})" in report
    for t in TASKS:
        assert {"individual - pretrained", "ties - multitask_lora", "multitask_full - multitask_lora"} <= set(
            results["comparisons"][t]
        )
    he = {r["method"]: r["humaneval"]["score"] for r in results["rows"]}
    for pair, d in results["humaneval_comparisons"].items():
        a, b = pair.split(" - ")
        assert d["estimate"] == pytest.approx(he[a] - he[b]) and d["low"] <= d["estimate"] <= d["high"]
    assert {"ties - pretrained", "ties - multitask_lora"} <= set(results["humaneval_comparisons"])
    assert json.loads((cfg.out / "results.json").read_text())["scenario"] == "gen-tasks"


def test_storage_of_each_way_to_serve(study):
    cfg, results = study
    base = sum(f.stat().st_size for f in Path(results["base"]).glob("*.safetensors"))
    adapters = [(cfg.out / "adapters" / t / "adapter_model.safetensors").stat().st_size for t in TASKS]
    serving = results["serving_bytes"]
    assert serving["one fused model"] == base == _row(results, "ties")["storage_bytes"]
    assert (
        serving["base + T adapters"] == base + sum(adapters) == _row(results, "individual")["storage_bytes"]
    )
    adapted = sum(
        v.numel() for v in dense_updates(cfg.out / "adapters" / TASKS[0], Path(results["base"])).values()
    )
    assert serving["a bundle"] > base + 4 * adapted  # the float32 vector, masks and scales on top


def _records(path: Path) -> dict:
    return EvalRecords(path).done


def _candidate(row, task):
    """The grid candidate whose validation score the row reports for `task` (a per-task parameter such
    as TALL-Masks' lambdas maps each task to its own candidate)."""
    return {k: v[task] if isinstance(v, dict) else v for k, v in row["params"].items()}


def test_results_recompute_from_the_records(study):
    cfg, results = study
    done = _records(cfg.out / "records.jsonl")
    ind = _row(results, "individual")
    for row in results["rows"]:
        for t in TASKS:
            rec = done[EvalRecords.key(row["method"], row["params"], t, "test")]
            vec = scores.decode_scores(rec["per_example"])
            assert row["test"][t] == rec["score"] == pytest.approx(float(np.mean(vec)))
            if ind["test"][t]:
                assert row["normalized"][t] == pytest.approx(row["test"][t] / ind["test"][t])
            if row["validation"] is not None:
                val = done[EvalRecords.key(row["method"], _candidate(row, t), t, "validation")]
                assert row["validation"][t] == val["score"]
        he = done[EvalRecords.key(row["method"], row["params"], "humaneval", "test")]
        assert row["humaneval"]["score"] == he["score"]
    doc = json.loads((cfg.out / "scores.json").read_text())
    assert set(doc["rows"]) >= {r["method"] for r in results["rows"]}


def test_a_rerun_trains_and_scores_nothing(study):
    cfg, results = study
    again = GenStudy(cfg, builder=builder).run()
    assert again["trained_this_run"] == [] and again["evaluations_this_run"] == 0
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(results["rows"], sort_keys=True)
    assert again["compute_s"] == results["compute_s"]  # the pieces of every run: this one ran none


def test_compute_over_runs_is_each_finished_piece_once(study):
    cfg, results = study
    logged = [json.loads(x) for x in (cfg.out / "compute.jsonl").read_text().splitlines()]
    pieces = [(x["run"], x["piece"]) for x in logged]
    assert len(pieces) == len(set(pieces))
    trained = {("training", k) for k in (*(f"expert/{t}" for t in TASKS), "multitask_lora", "multitask_full")}
    assert trained | {("scoring", "pretrained"), ("scoring", "multitask_full")} <= set(pieces)
    training = sum(x["seconds"] for x in logged if x["run"] == "training")
    assert results["compute_s"]["training"] == pytest.approx(training, abs=0.2) and training > 0
    assert results["compute_s"]["scoring"] > 0
    assert "Finished pieces over every run of this folder" in (cfg.out / "report.md").read_text()


def _without_full_test(path: Path) -> None:
    lines = path.read_text().splitlines()
    drop = next(i for i, x in enumerate(lines) if x.startswith('{"key": "multitask_full|') and '|test"' in x)
    path.write_text("".join(x + "\n" for i, x in enumerate(lines) if i != drop))


def test_a_fresh_cache_reads_multitask_full_from_the_records(study, tmp_path):
    """A fresh clone has the committed adapters and records, not the full fine-tune (a whole model): its
    row comes from the records (with its recorded bytes), nothing is trained; one record short, it is
    trained again."""
    cfg, results = study
    out = tmp_path / "out"
    shutil.copytree(cfg.out, out)
    (out / "compute.jsonl").unlink()  # an earlier version's folder: training seconds from the run records
    again = GenStudy(replace(cfg, out=out, cache=tmp_path / "cache"), builder=builder).run()
    assert again["trained_this_run"] == [] and again["evaluations_this_run"] == 0
    recorded = [json.loads((p / "sefusion-train.json").read_text()) for p in (out / "adapters").iterdir()]
    assert again["compute_s"]["training"] == pytest.approx(sum(r["train_seconds"] for r in recorded), abs=0.5)
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(results["rows"], sort_keys=True)
    _without_full_test(out / "records.jsonl")
    with one_thread():
        third = GenStudy(replace(cfg, out=out, cache=tmp_path / "cache2"), builder=builder).run()
    assert third["trained_this_run"] == ["multitask_full"] and third["evaluations_this_run"] == 1
    assert _row(third, "multitask_full")["test"] == _row(results, "multitask_full")["test"]


def test_the_statistics_rows_rebuild_on_a_fresh_cache_computing_statistics_only_when_scored(study, tmp_path):
    """Each expert's statistics live in the cache, not in <out>. A fresh cache with every record computes
    none; with fisher's and regmean's test records dropped (what the rebuild test does), the test run
    computes them first and the two rows score as before."""
    cfg, results = study
    logged = [json.loads(x)["piece"] for x in (cfg.out / "compute.jsonl").read_text().splitlines()]
    assert {f"stats/{t}" for t in TASKS} <= set(logged)  # computed, and gone once every row is recorded
    assert not list((cfg.cache / "gen-study").glob("*/stats/*/stats.json"))
    out = tmp_path / "out"
    shutil.copytree(cfg.out, out)
    again = GenStudy(replace(cfg, out=out, cache=tmp_path / "cache"), builder=builder).run()
    assert again["evaluations_this_run"] == 0 and not list((tmp_path / "cache").glob("gen-study/*/stats"))
    lines = (out / "records.jsonl").read_text().splitlines()
    dropped = [x for x in lines if x.startswith(('{"key": "fisher|', '{"key": "regmean|')) and '|test"' in x]
    (out / "records.jsonl").write_text("".join(x + "\n" for x in lines if x not in dropped))
    ex = Recording()
    logged = len((out / "compute.jsonl").read_text().splitlines())
    with one_thread():
        third = GenStudy(replace(cfg, out=out, cache=tmp_path / "cache2"), builder=builder, executor=ex).run()
    assert third["evaluations_this_run"] == len(dropped) == 2 * (len(TASKS) + 1)
    test = dict(ex.runs[2])
    assert test["test/fisher"] == ("inputs", *(f"stats/{t}" for t in TASKS))
    # what ran, in order: the first scoring run only the LoRA combinations (always remade: the storage
    # reads them); the test run the statistics, then the two rows
    ran = [json.loads(x)["piece"] for x in (out / "compute.jsonl").read_text().splitlines()[logged:]]
    assert sorted(ran[:2]) == ["combine/lora_cat", "combine/lora_linear"]
    ran = ran[2:]
    assert sorted(ran[: len(TASKS)]) == [f"stats/{t}" for t in sorted(TASKS)]
    assert sorted(ran[len(TASKS) :]) == ["test/fisher", "test/regmean"]
    assert not list((tmp_path / "cache2").glob("gen-study/*/stats/*/stats.json"))
    for row in ("fisher", "regmean"):
        assert _row(third, row)["test"] == _row(results, row)["test"]


def test_the_pretrained_row_asks_a_base_through_its_chat_template_where_it_has_one(
    study, tmp_path, monkeypatch
):
    """An instruct base answers plain prompts with nothing: the pretrained row asks the tasks through the
    base's chat template (the tiny base has one), HumanEval stays plain completion. A base without a
    template is asked plainly, under other record keys; every other row is read back unchanged."""
    from sefusion.study import gen_pieces

    cfg, results = study
    chat = _row(results, "pretrained")
    assert chat["params"] == {"prompt": "chat template"}
    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(cfg.base, base)
    (base / "chat_template.jinja").unlink()
    shutil.copytree(cfg.out, out)
    calls, real = [], gen_pieces.evaluate

    def spy(inputs, lm, tok, task, split, chat=False):
        calls.append((task, split, chat))
        return real(inputs, lm, tok, task, split, chat)

    monkeypatch.setattr(gen_pieces, "evaluate", spy)
    with one_thread():
        again = GenStudy(replace(cfg, base=base, out=out, cache=tmp_path / "cache"), builder=builder).run()
    assert again["trained_this_run"] == [] and again["evaluations_this_run"] == 2 * len(TASKS) + 1
    assert sorted(calls) == sorted([*((t, s, False) for t in TASKS for s in ("validation", "test")),
                                    ("humaneval", "test", False)])  # fmt: skip
    plain = _row(again, "pretrained")
    assert plain["params"] == {} and plain["humaneval"]["score"] == chat["humaneval"]["score"]
    assert all(
        plain["validation"][t] != chat["validation"][t] for t in TASKS
    )  # the template reached the model
    for a, b in zip(again["rows"][1:], results["rows"][1:], strict=True):
        assert a["test"] == b["test"] and a["params"] == b["params"]


def test_a_record_scored_before_fenced_replies_ran_whole_is_scored_again(study, tmp_path):
    """Records made before reply scoring 2 (no "reply_scoring") are read, except a generate-* one with a
    reply that holds a code fence (scored otherwise since): that one evaluation alone is scored again."""
    cfg, results = study
    out = tmp_path / "out"
    shutil.copytree(cfg.out, out)
    lines, fenced = [], None
    for line in (out / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        result = rec.get("result", {})
        result.pop("reply_scoring", None)
        if fenced is None and rec.get("key", "").endswith("|generate-python|test"):
            replied = [e for e in result["examples"] if "reply" in e]
            replied[0]["reply"], fenced = "```python\n" + replied[0]["reply"], rec["key"]
        lines.append(json.dumps(rec) + "\n")
    assert fenced is not None and sum("reply_scoring" in x for x in lines) == 0
    (out / "records.jsonl").write_text("".join(lines))
    with one_thread():
        again = GenStudy(replace(cfg, out=out), builder=builder).run()
    assert again["trained_this_run"] == [] and again["evaluations_this_run"] == 1
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(results["rows"], sort_keys=True)
    last = json.loads((out / "records.jsonl").read_text().splitlines()[-1])
    assert last["key"] == fenced and last["result"]["reply_scoring"] == 2


def test_selection_reads_validation_only(study, tiny, tmp_path):
    """Candidates are scored on validation; test holds only the chosen one's scores. With other test
    data (same train and validation), every method chooses the same parameters."""
    cfg, results = study
    done = _records(cfg.out / "records.jsonl")
    for row in results["rows"]:
        if "grid" not in row:
            continue
        tested = {k.split("|")[1] for k in done if k.startswith(row["method"] + "|") and k.endswith("|test")}
        assert tested == {json.dumps(row["params"], sort_keys=True)}, row["method"]
    other = config(
        tiny, tmp_path / "out", cfg.cache, methods=["task_arithmetic", "tall_masks", "lora_linear"]
    )
    moved = GenStudy(other, builder=lambda t, *a: synthetic(t, test_offset=6)).run()
    assert moved["trained_this_run"] == [*TASKS, "multitask_lora"]
    for method in ("task_arithmetic", "tall_masks", "lora_linear"):
        a, b = _row(results, method), _row(moved, method)
        assert a["params"] == b["params"] and a["grid"] == b["grid"]
    assert all(moved["data"][t]["fingerprint"] != results["data"][t]["fingerprint"] for t in TASKS)


def test_the_pairs_a_generative_report_compares():
    methods = [
        "pretrained",
        "individual",
        "ties",
        "tall_masks",
        "scaling_masks",
        "multitask_lora",
        "multitask_full",
    ]
    assert gen_pairs(methods) == [
        ("individual", "pretrained"),
        *[
            (m, "individual")
            for m in ("multitask_lora", "ties", "tall_masks", "scaling_masks", "multitask_full")
        ],
        ("scaling_masks", "tall_masks"),
        *[(m, "multitask_lora") for m in ("ties", "tall_masks", "scaling_masks", "multitask_full")],
    ]
    assert humaneval_pairs(["pretrained", "individual", "ties", "multitask_lora"]) == [
        ("individual", "pretrained"), ("ties", "pretrained"), ("multitask_lora", "pretrained"),
        ("individual", "multitask_lora"), ("ties", "multitask_lora"),
    ]  # fmt: skip
    assert humaneval_pairs(["individual", "ties"]) == []


def test_an_expert_is_clearly_above_the_base_only_when_its_interval_is():
    def diff(est, low, high):
        return {"estimate": est, "low": low, "high": high, "level": 0.95, "significant": low > 0 or high < 0}

    rows = [{"method": m, "test": {"a": 0.5, "b": 0.5, "c": 0.5}} for m in ("pretrained", "individual")]
    results = {
        "tasks": ["a", "b", "c"], "rows": rows,
        "experts": {t: {"metric": "pass@1"} for t in "abc"},
        "comparisons": {"a": {"individual - pretrained": diff(0.2, 0.1, 0.3)},
                        "b": {"individual - pretrained": diff(0.1, -0.05, 0.25)},
                        "c": {"individual - pretrained": diff(-0.2, -0.3, -0.1)}},
    }  # fmt: skip
    cells = {
        line.split(" | ")[0][2:]: line.rsplit(" | ", 1)[1][:-2] for line in _experts_table(results)[4:][2:]
    }
    assert cells == {"a": "yes", "b": "no", "c": "no"}


def test_select_by_loss_by_hand():
    cands = [{"lambda": 0.5}, {"lambda": 1.0}]
    val = [{"a": 2.0, "b": 4.0}, {"a": 1.5, "b": 6.0}]
    ref = {"a": 1.0, "b": 2.0}
    # relative losses: (2 + 2) / 2 = 2 against (1.5 + 3) / 2 = 2.25: the first wins
    assert select_by_loss(cands, val, ref, None) == ({"lambda": 0.5}, {"a": 2.0, "b": 4.0})
    cands = [{"lambdas": 0.2}, {"lambdas": 0.4}]
    assert select_by_loss(cands, val, ref, "lambdas") == (
        {"lambdas": {"a": 0.4, "b": 0.2}},
        {"a": 1.5, "b": 4.0},
    )


def _factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, alpha / r)} read from the adapter's own files, in float64."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (a.double(), b.double(), cfg["lora_alpha"] / cfg["r"])
    return out


def test_lora_cat_is_the_exact_sum_of_the_updates_and_linear_sums_the_factors(tiny, tmp_path):
    ads = [
        random_adapter(tiny, tmp_path / f"a{i}", r, alpha, i) for i, (r, alpha) in enumerate([(4, 8), (2, 7)])
    ]
    cat = dense_updates(combine(tiny, ads, "cat", tmp_path / "cat"), tiny)
    facts = [_factors(a) for a in ads]
    assert set(cat) == {f"{m}.weight" for m in facts[0]}
    for module in facts[0]:
        want = sum(s * (b @ a) for a, b, s in (f[module] for f in facts))
        got = cat[f"{module}.weight"].double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module
    same = [random_adapter(tiny, tmp_path / f"s{i}", 4, 4 + 4 * i, 10 + i) for i in range(2)]
    lin = dense_updates(combine(tiny, same, "linear", tmp_path / "lin"), tiny)
    facts = [_factors(a) for a in same]
    for module in facts[0]:
        parts = [f[module] for f in facts]
        a_sum = sum(math.sqrt(s) * a for a, _, s in parts)
        b_sum = sum(math.sqrt(s) * b for _, b, s in parts)
        assert torch.allclose(lin[f"{module}.weight"].double(), b_sum @ a_sum, rtol=1e-5, atol=1e-6)


def test_adapters_of_another_base_and_foreign_folders_are_refused(study, tmp_path):
    cfg, _ = study
    other = make_causal(tmp_path / "other", seed=1)
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    (out / "records.jsonl").unlink()
    with pytest.raises(CheckpointError, match="trained on another base"):
        GenStudy(config(other, out, tmp_path / "cache"), builder=builder).run()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="pass --overwrite"):
        GenStudy(config(other, foreign, tmp_path / "cache"), builder=builder).run()
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_names_bad_input_in_one_line(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    BertModel(cfg).save_pretrained(bert)
    capsys.readouterr()  # the save's progress bar
    assert main(["study", "gen-tasks", "--out", str(tmp_path / "o"), "--base", str(bert), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sefusion: error: base") and "is not a causal LM" in err and err.count("\n") == 1
    assert main(["study", "gen-tasks", "--out", str(tmp_path / "o"), "--humaneval-limit", "0"]) == 2
    assert "--humaneval-limit must be positive" in capsys.readouterr().err
    assert main(["study", "gen-cross", "--out", str(tmp_path / "o"), "--seeds", "3"]) == 2
    assert "--seeds and --data-seed are not supported" in capsys.readouterr().err
    assert main(["study", "gen-nothing", "--out", str(tmp_path / "o")]) == 2
    assert "gen-tasks, gen-languages, gen-cross" in capsys.readouterr().err


def test_scenarios_and_budgets():
    assert GEN_SCENARIOS["gen-tasks"].tasks == (
        "generate-python",
        "summarize-python",
        "repair-python",
        "complete-python",
    )
    assert len(GEN_SCENARIOS["gen-languages"].tasks) == 6
    cross = GEN_SCENARIOS["gen-cross"].tasks
    assert (
        len(cross) >= 4
        and len({t.split("-")[0] for t in cross}) >= 3
        and len({t.split("-")[1] for t in cross}) >= 3
    )


def test_tiny_positive_scores_are_not_taken_for_reciprocal_ranks():
    for v in ([2.3e-78, 5.9e-78], [1.0, 0.5, 0.25], [5.25, 3.5]):
        assert scores.decode_scores(scores.encode_scores(v)).tolist() == v
    assert "ranks" in scores.encode_scores([1.0, 0.5, 0.25]) and "f8" in scores.encode_scores([2.3e-78])


MACHINE = ("base", "hardware", "versions", "train_seconds")  # an expert's train record: this machine's
GEN_FIXTURE = Path(__file__).parent / "fixtures" / "gen_study_tiny_results.json"


def gen_canonical(results: dict, out: Path) -> str:
    """results.json less the base's path, the timings and the machine, with scores.json, the records (as
    sorted lines) and the adapters' files: what two runs of one study must share, however executed."""
    kept = {k: v for k, v in results.items() if k not in ("base", "timings_s", "wall_s", "compute_s")}
    kept["experts"] = {t: {**e, "train": {k: v for k, v in e["train"].items() if k not in MACHINE}}
                       for t, e in results["experts"].items()}  # fmt: skip
    kept["scores.json"] = json.loads((out / "scores.json").read_text())
    kept["records.jsonl"] = sorted(
        _without_machine(x) for x in (out / "records.jsonl").read_text().splitlines()
    )
    kept["adapters"] = sorted(str(p.relative_to(out)) for p in (out / "adapters").rglob("*"))
    return json.dumps(kept, sort_keys=True, indent=1) + "\n"


def _without_machine(line: str) -> str:
    """A records line less its CPU and torch thread count (the machine's), which every evaluation record
    has (records are written by json.dumps: the line comes back as it was)."""
    rec = json.loads(line)
    if "result" in rec:
        machine = [rec["result"].pop(k) for k in ("cpu", "cpu_isa", "torch_threads")]
        assert machine[0] and machine[1] and machine[2] >= 1, line[-160:]
    return json.dumps(rec)


def assert_same(got: object, want: object, where: str = "") -> None:
    """Equal structures; floats to 1e-5 relative (another CPU's kernels round the last digits apart)."""
    if isinstance(want, float) and isinstance(got, (int, float)):
        both_nan = math.isnan(want) and math.isnan(got)
        assert both_nan or got == pytest.approx(want, rel=1e-5, abs=1e-9), where
    elif isinstance(want, dict) and isinstance(got, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def _decoded(obj: object) -> object:
    """Encoded per-example scores as float lists (they differ in the last bits between machines too)."""
    if isinstance(obj, dict):
        if "n" in obj and ("f8" in obj or "ranks" in obj or "bits" in obj):
            return [float(x) for x in scores.decode_scores(obj)]
        return {k: _decoded(v) for k, v in obj.items()}
    return obj


def canonical_tree(text: str) -> dict:
    tree = json.loads(text)
    # a model's sha256 is of its trained bytes, which another CPU rounds apart: the scores are compared
    records = ({**_decoded(json.loads(line)), "sha256": "-"} for line in tree["records.jsonl"])
    tree["records.jsonl"] = sorted(records, key=lambda r: (r.get("key", ""), r.get("model", "")))
    return tree


def test_in_process_results_are_what_the_fixture_holds(study):
    """The fixture was first written by the study before its work became executor pieces; rewritten
    (SEFUSION_WRITE_FIXTURE=1) only when the study's output changes on purpose (last: the generate-*
    test split kept its runnable problems beyond the cut; then the pairs against the base and
    multitask_lora, and the HumanEval differences, were added; then the pretrained row asked through the
    base's chat template; then the budget's full_micro_batch; then the quality measures' intervals; then
    each evaluation record's reply_scoring)."""
    cfg, results = study
    got = gen_canonical(results, cfg.out)
    if os.environ.get("SEFUSION_WRITE_FIXTURE"):
        GEN_FIXTURE.write_text(got)
    assert_same(canonical_tree(got), canonical_tree(GEN_FIXTURE.read_text()))


def test_the_study_is_three_runs_of_pieces_and_the_bar_total_is_exact(study):
    """Training (each expert and both multitask models, independent of each other); the baselines, every
    candidate on validation (LoRA-native ones after their PEFT combination) and the multitask models; each
    chosen candidate on test. Every scoring piece takes the one inputs piece."""
    training, first, test = (dict(run) for run in RUNS.runs[:3])
    assert set(training) == {*TASKS_KEYS, "multitask_lora", "multitask_full"}
    assert not any(training.values())
    methods, _ = study_methods()
    rows = [*methods, "lora_cat", "lora_linear"]
    cands = {k for k in first if k.startswith("cand/")}
    assert {k.split("/")[1] for k in cands} == set(rows)
    stats = tuple(f"stats/{t}" for t in TASKS)
    prereq = {"combine/lora_cat", "combine/lora_linear", *stats}
    assert set(first) - cands == {"inputs", "pretrained", "individual", "multitask_lora", "multitask_full",
                                  *prereq}  # fmt: skip
    for k in cands:
        row = k.split("/")[1]
        need = (
            (f"combine/{row}",) if row.startswith("lora_") else stats if row in ("fisher", "regmean") else ()
        )
        assert first[k] == ("inputs", *need)
    assert set(test) == {"inputs", *(f"test/{r}" for r in rows), *prereq}
    assert RUNS.total == sum(map(len, RUNS.runs[:3]))


def test_committed_generative_reports_are_their_results_rendered():
    """Each committed results/gen-*/report.md is exactly what its results.json renders (nothing edited by
    hand), and every quality cell, HumanEval's included, carries its intervals."""
    from sefusion.study.gen_report import render_gen_markdown

    root = Path(__file__).resolve().parents[1] / "results"
    cells = []
    for folder in sorted(p.parent for p in root.glob("gen-*/results.json")):
        results = json.loads((folder / "results.json").read_text())
        assert (folder / "report.md").read_text() == render_gen_markdown(results), folder
        for row in results["rows"]:
            cells += [
                *row["quality"].values(),
                *([row["humaneval"]["quality"]] if row.get("humaneval") else []),
            ]
    assert cells and all(set(c["intervals"]) == {"parse_rate", "findings_total_per_100"} for c in cells)


def _mapped_from(folder: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from files in `folder` (Linux's /proc/self/maps)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(folder) in line:
            lo, hi = line.split()[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_expert_bodies_are_mapped_from_an_unlinked_file_with_the_same_values(tmp_path):
    import torch

    from sefusion.study.gen_pieces import _file_backed

    held = {"w": torch.randn(64, 32), "b": torch.randn(7, dtype=torch.float64)}
    mapped = _file_backed(held, tmp_path / "scratch")
    assert all(torch.equal(mapped[k], v) and mapped[k].dtype == v.dtype for k, v in held.items())
    assert not any((tmp_path / "scratch").iterdir())  # nothing left behind on disk
    spans = _mapped_from(tmp_path / "scratch")
    for t in mapped.values():  # each tensor reads the (unlinked) file's pages, not the heap
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans)


def test_bodies_stay_on_the_heap_where_no_file_can_be_written(tmp_path, caplog):
    import torch

    from sefusion.study.gen_pieces import _file_backed

    held = {"w": torch.randn(4, 4)}
    assert _file_backed(held, None) is held
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="sefusion"):
        assert _file_backed(held, blocker / "scratch") is held  # a folder under a file: cannot be made
    assert "stay in memory" in caplog.text and str(blocker) in caplog.text

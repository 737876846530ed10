"""`sefusion eval MODEL --task NAME` (sefusion.study.gen_eval) and `sefusion train --task` on a tiny LM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sefusion.cli import main
from sefusion.models import causal
from sefusion.study import gen_eval
from sefusion.study.gen_eval import GenEvalConfig, evaluate_task
from sefusion.tasks import textmetrics
from sefusion.tasks.generative import STOP_STRINGS
from test_generative import problems  # noqa: F401 - a fixture
from tiny_causal import make_causal

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_causal(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


def test_summaries_are_the_models_greedy_replies_scored_one_by_one(tiny, task_cache):
    cfg = GenEvalConfig(limit=5, batch_size=2, precision="fp32")
    records, summary = evaluate_task(tiny, "summarize-python", cfg, cache=task_cache)
    examples, prov = gen_eval.task_examples("summarize-python", cfg, task_cache)
    lm, tok = causal.load_causal(tiny)
    want = causal.generate(lm, tok, [e.prompt for e in examples], max_new_tokens=48,
                           stop=STOP_STRINGS["summarize"], batch_size=1)  # fmt: skip
    assert [r["reply"] for r in records] == want
    for metric in ("bleu4", "rouge_l"):
        refs = [e.target for e in examples]
        firsts = [next((x.strip() for x in w.split("\n") if x.strip()), "") for w in want]
        assert [r[metric] for r in records] == textmetrics.per_example(metric, refs, firsts)
        m = summary["metrics"][metric]
        assert m["n"] == 5 and m["mean"] == pytest.approx(np.mean([r[metric] for r in records]))
        assert m["low"] <= m["mean"] <= m["high"]
    assert summary["task_provenance"]["fingerprint"] == prov["fingerprint"] and summary["examples"] == 5


def test_generate_runs_only_scorable_problems_and_scores_every_target_loss(tiny, problems, monkeypatch):  # noqa: F811
    chosen = [problems[k] for k in ("area", "wrong", "plain", "double", "twice")]
    monkeypatch.setattr(gen_eval, "task_examples", lambda *a, **k: (chosen, {"fingerprint": "x"}))
    records, summary = evaluate_task(
        tiny, "generate-python", GenEvalConfig(precision="fp32", max_new_tokens=8)
    )
    # `wrong` fails its own doctest, `plain` has none: neither is generated
    assert [r["index"] for r in records if "reply" in r] == [0, 3, 4]
    assert all(r["pass@1"] in (0.0, 1.0) for r in records if "reply" in r)
    assert all("pass@1" not in r for r in records if "reply" not in r)
    assert summary["metrics"]["pass@1"]["n"] == 3 and summary["metrics"]["target_loss"]["n"] == 5
    lm, tok = causal.load_causal(tiny)
    for ex, got in zip(chosen, [r["target_loss"] for r in records], strict=True):
        # the reference: transformers' own loss (mean over labelled tokens) on prompt + target + EOS
        p = tok(ex.prompt)["input_ids"]
        t = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + t])
        labels = torch.tensor([[-100] * len(p) + t])
        with torch.no_grad():
            assert got == pytest.approx(float(lm(input_ids=ids, labels=labels).loss), rel=1e-4)


def test_eval_task_cli_writes_records_and_names_misuse(tiny, task_cache, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", str(tiny), "--task", "summarize-python", "--limit", "2", "--cache", str(task_cache)]
    assert main([*args, "--out", str(out), "--precision", "fp32", "-q"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 2 and summary["task"] == "summarize-python"
    assert math.isclose(
        summary["metrics"]["rouge_l"]["mean"], (records[0]["rouge_l"] + records[1]["rouge_l"]) / 2
    )
    assert "summarize-python test: bleu4" in capsys.readouterr().out
    assert main([*args, "--out", str(out)]) == 2 and "exists" in capsys.readouterr().err
    assert main([*args, "--completions", str(tmp_path / "c.jsonl")]) == 2
    assert "--task scores a MODEL" in capsys.readouterr().err
    assert main(["eval", str(tiny), "--task", "summarize-rust"]) == 2
    assert "unknown generative task 'summarize-rust'" in capsys.readouterr().err


def test_train_cli_builds_a_tasks_train_split(tiny, task_cache, tmp_path, capsys):
    args = ["train", str(tiny), str(tmp_path / "ad"), "--steps", "1", "--batch", "1", "--micro-batch", "1"]
    assert (
        main([*args, "--max-len", "64", "--task", "summarize-python", "--cache", str(task_cache), "-q"]) == 0
    )
    meta = json.loads((tmp_path / "ad" / "sefusion-train.json").read_text())
    assert list(meta["tasks"]) == ["summarize-python"] and meta["tasks"]["summarize-python"] > 100
    assert main(args) == 2 and "--data FILE.jsonl or --task NAME" in capsys.readouterr().err

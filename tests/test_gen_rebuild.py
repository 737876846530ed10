"""The committed generative scenarios rebuild on a fresh clone: from `results/gen-*/` (adapters, records,
results.json) alone, every fusion and LoRA row is fused again from the committed adapters and scored
again on test, and each test score equals the committed one exactly. Nothing is trained.

What is kept of the committed records: validation (the selection, so the same candidate is chosen),
HumanEval (164 generations a row: hours), the rows whose model is not committed (`multitask_full`, a
whole model) and the two rows that fuse nothing (`pretrained`, `individual`; see KEEP_ROWS). Every row
fused from the committed adapters is scored again on test; fisher's and regmean's statistics (gigabytes
an expert, not committed) are computed again from the adapters and the training pairs. Slow (minutes a
row); needs the base (`sefusion base fetch NAME` once). SEFUSION_REBUILD=FOLDER,... checks other study
folders too (e.g. a quick run's `--out`); SEFUSION_REBUILD_ROWS=ROW,... rebuilds only those fusion rows
(and multitask_lora), so that a scenario's check can be split across machines.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
NOT_COMMITTED = ("multitask_full",)  # its weights are not committed: its records are the row
# The rows that fuse nothing keep their records too: greedy generation in bf16 on the CPU changes with the
# torch thread count, and gen-tasks scored these two early, partly at two threads (individual's
# summarize-python BLEU-4 is 0.15909 at one thread, 0.15845 at two: the committed value; pretrained's
# 0.07247 and 0.07138 against the committed 0.07269, whose conditions are not known). Every row fused from
# the committed adapters is scored again, at the thread count its test records state (`scored_threads`).
KEEP_ROWS = (*NOT_COMMITTED, "pretrained", "individual")


def folders() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SEFUSION_REBUILD", "").split(",") if p]
    return sorted(p.parent for p in RESULTS.glob("gen-*/results.json")) + extra


def asked_rows() -> set[str]:
    """SEFUSION_REBUILD_ROWS's fusion rows (empty: every one)."""
    return {r for r in os.environ.get("SEFUSION_REBUILD_ROWS", "").split(",") if r}


def kept(line: str) -> bool:
    """Whether a records line survives into the rebuild (headers and model hashes always do)."""
    rec = json.loads(line)
    if "key" not in rec:
        return True
    row = rec["key"].split("|", 1)[0]
    task, split = rec["key"].rsplit("|", 2)[1:]
    return split != "test" or task == "humaneval" or row in KEEP_ROWS


def scored_threads(folder: Path) -> int:
    """The torch threads the committed fused rows were scored at on test (their records say; gen-tasks's
    records predate the field and were all scored at one thread): the rebuild scores at the same count."""
    counts = set()
    for line in (folder / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "key" in rec and not kept(line):
            counts.add(rec["result"].get("torch_threads", 1) if isinstance(rec["result"], dict) else 1)
    assert len(counts) <= 1, (folder, counts)  # one count for every rescored record
    return counts.pop() if counts else 1


def rebuild(folder: Path, out: Path) -> dict:
    from sefusion.study.gen_study import LORA_ROWS, GenStudyConfig, run_gen_study, study_methods

    committed = json.loads((folder / "results.json").read_text())
    out.mkdir(parents=True)
    shutil.copytree(folder / "adapters", out / "adapters")
    shutil.copy(folder / "gen-study.json", out / "gen-study.json")
    lines = (folder / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("".join(line + "\n" for line in lines if kept(line)))
    # the committed rows only (a row added to the study since is not rebuilt), or those asked for
    fused = [r["method"] for r in committed["rows"] if r["method"] in [*study_methods()[0], *LORA_ROWS]]
    only = asked_rows()
    assert only <= set(fused), (only, fused)
    fused = [r for r in fused if r in only] if only else fused
    cfg = GenStudyConfig(
        scenario=committed["scenario"], out=out, budget=committed["budget"], base=Path(committed["base"]).name,
        seed=committed["seed"], quiet=True, methods=fused,
    )  # fmt: skip
    return run_gen_study(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("folder", folders(), ids=lambda p: p.name)
def test_the_committed_adapters_rebuild_every_row_on_test(folder: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    committed = json.loads((folder / "results.json").read_text())
    threads = scored_threads(folder)
    monkeypatch.setenv("SEFUSION_THREADS", str(threads))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = rebuild(folder, tmp_path / "out")
    finally:
        torch.set_num_threads(before)
    assert again["trained_this_run"] == []
    rows = {r["method"]: r for r in again["rows"]}
    only = asked_rows()
    expected = [
        r for r in committed["rows"] if not only or r["method"] in {*only, *KEEP_ROWS, "multitask_lora"}
    ]
    assert set(rows) == {r["method"] for r in expected}
    for row in expected:
        assert rows[row["method"]]["params"] == row["params"], row["method"]
        assert rows[row["method"]]["test"] == row["test"], row["method"]
    rescored = set(rows) - set(KEEP_ROWS)
    assert again["evaluations_this_run"] == len(rescored) * len(committed["tasks"])


def test_a_committed_scenario_keeps_what_rebuilding_needs() -> None:
    """Fast: each committed scenario has its adapters (one per task and multitask_lora), its manifest and
    records with every validation score the selection reads."""
    for folder in folders():
        results = json.loads((folder / "results.json").read_text())
        names = {p.name for p in (folder / "adapters").iterdir()}
        assert names == {*results["tasks"], "multitask_lora"}, folder
        assert (folder / "gen-study.json").is_file()
        keys = {json.loads(x).get("key") for x in (folder / "records.jsonl").read_text().splitlines()}
        for row in results["rows"]:
            for t in (row.get("validation") or {}) if row["method"] not in NOT_COMMITTED else ():
                found = [
                    k
                    for k in keys
                    if k and k.startswith(f"{row['method']}|") and k.endswith(f"|{t}|validation")
                ]
                assert found, (folder, row["method"], t)

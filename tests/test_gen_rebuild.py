"""The committed generative scenarios rebuild on a fresh clone: from `results/gen-*/` (adapters, records,
results.json) alone, every fusion and LoRA row is fused again from the committed adapters and scored
again on test, and each test score equals the committed one exactly. Nothing is trained. Exactly on the
kind of CPU that made the committed scores (their records say, or the adapters' run records): on another
kind, greedy bf16 generation picks other tokens on a few examples (an AMD EPYC with AVX512-BF16, against
the committed Intel Xeon's, moved 2 to 4 of 40 summaries and one of 19 generated functions), and each
rebuilt row must then agree with its committed scores (`agrees`: within the study's paired 95% interval,
and few examples apart).

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
import warnings
from pathlib import Path

import numpy as np
import pytest

from sefusion.study.runner import EvalRecords
from sefusion.study.scores import decode_scores
from sefusion.study.uncertainty import paired_difference

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


def committed_cpu(folder: Path) -> tuple[str, str | None]:
    """The kind of CPU that scored the committed fused rows on test (cpu, cpu_isa): their records say;
    records made before those fields are counted as made where the adapters were trained (the adapters'
    run records name the CPU model, not its instruction sets)."""
    runs = (folder / "adapters").glob("*/sefusion-train.json")
    trained = {(json.loads(r.read_text())["hardware"]["cpu"], None) for r in runs}
    lines = (folder / "records.jsonl").read_text().splitlines()
    rescored = [json.loads(x)["result"] for x in lines if not kept(x)]
    kinds = {(r["cpu"], r["cpu_isa"]) for r in rescored if isinstance(r, dict) and "cpu" in r}
    if any(not isinstance(r, dict) or "cpu" not in r for r in rescored):
        kinds |= trained
    assert len(kinds) == 1, (folder, kinds)  # one kind of CPU for every rescored record
    return kinds.pop()


def same_cpu(committed: tuple[str, str | None], here: dict[str, str]) -> bool:
    """Whether this machine is the kind of CPU the committed scores were made on, as far as it is known
    (a model name alone, such as a VM's "Intel(R) Xeon(R) Processor", may hide other instruction sets:
    the exact check's message names both)."""
    name, isa = committed
    return name == here["cpu"] and isa in (None, here["cpu_isa"])


def per_example(records: EvalRecords, key: str) -> np.ndarray:
    """The per-example scores of the latest record under `key`."""
    found = records.get(key)
    assert found, (records.path, key)
    return decode_scores(found["per_example"])


def agrees(committed: np.ndarray, again: np.ndarray, clusters: list[str]) -> bool:
    """Whether a row scored again on another kind of CPU agrees with its committed scores: the study's
    paired 95% interval of their difference (examples clustered by file) holds 0, and at most a tenth of
    the examples (at least 2) scored apart. Greedy bf16 generation there picks other tokens on a few
    replies: 1 to 4 a row of 19 or 40, measured once (gen-tasks, an AMD EPYC against an Intel Xeon)."""
    apart = int((committed != again).sum())
    return apart <= max(2, committed.size // 10) and not paired_difference(
        again, committed, clusters
    ).excludes(0.0)


def check_within_intervals(folder: Path, out: Path, row: dict, tasks: list[str]) -> None:
    """A row rescored on another kind of CPU agrees with its committed scores on every task (`agrees`)."""
    from sefusion.study.scores import decode_clusters

    clusters = json.loads((folder / "scores.json").read_text())["tasks"]
    committed, again = (EvalRecords(f / "records.jsonl") for f in (folder, out))
    for task in tasks:
        key = EvalRecords.key(row["method"], row["params"], task, "test")
        was, now = per_example(committed, key), per_example(again, key)
        print(f"{folder.name} {row['method']} {task}: {int((was != now).sum())} of {was.size} examples apart")
        assert agrees(was, now, decode_clusters(clusters[task]["clusters"])), (key, was.mean(), now.mean())


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

    from sefusion.models.causal_train import cpu_kind

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
    scored_on, here = committed_cpu(folder), cpu_kind()
    exact = same_cpu(scored_on, here)
    for row in expected:
        name = row["method"]
        assert rows[name]["params"] == row["params"], name
        if exact or name in KEEP_ROWS:
            assert rows[name]["test"] == row["test"], (name, "committed on", scored_on, "here", here)
        else:
            check_within_intervals(folder, tmp_path / "out", row, committed["tasks"])
    if not exact:
        where = f"{folder.name}: scored on {here}, not the committed scores' CPU {scored_on}"
        warnings.warn(f"{where}: rows checked within the paired interval, not exactly", stacklevel=1)
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


def test_the_committed_scores_name_their_cpu() -> None:
    """Fast: gen-tasks' records predate the CPU fields; its adapters were trained, and its rows scored, on
    one kind of Intel Xeon. A machine matches it by model name while the instruction sets are unknown."""
    xeon = committed_cpu(RESULTS / "gen-tasks")
    assert xeon == ("Intel(R) Xeon(R) Processor", None)
    assert same_cpu(xeon, {"cpu": "Intel(R) Xeon(R) Processor", "cpu_isa": "AVX512 amx"})
    assert not same_cpu(xeon, {"cpu": "AMD EPYC", "cpu_isa": "AVX512 avx512_bf16"})
    assert not same_cpu(("AMD EPYC", "AVX2"), {"cpu": "AMD EPYC", "cpu_isa": "AVX512 avx512_bf16"})


def test_a_row_on_another_cpu_agrees_only_within_its_interval() -> None:
    """Fast, on committed scores: multitask_lora's 40 summaries with two of them scored as another row
    scored them (what another CPU did to this row) agree with the committed ones; the base's do not, nor
    do five moved summaries."""
    from sefusion.study.scores import decode_clusters

    folder = RESULTS / "gen-tasks"
    rows = {r["method"]: r for r in json.loads((folder / "results.json").read_text())["rows"]}
    records = EvalRecords(folder / "records.jsonl")

    def scores(row: str) -> np.ndarray:
        return per_example(records, EvalRecords.key(row, rows[row]["params"], "summarize-python", "test"))

    files = decode_clusters(
        json.loads((folder / "scores.json").read_text())["tasks"]["summarize-python"]["clusters"]
    )
    mine, other = scores("multitask_lora"), scores("ties")
    differ = np.nonzero(mine != other)[0]
    moved = mine.copy()
    moved[differ[:2]] = other[differ[:2]]
    assert agrees(mine, moved, files)
    moved[differ[:5]] = other[differ[:5]]
    assert not agrees(mine, moved, files)
    assert not agrees(mine, scores("pretrained"), files)

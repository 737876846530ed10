"""The generative study (tiny Llama, two synthetic tasks) on a two-node Ray cluster simulated on this
machine: what the in-process study writes (its fixture), the driver training and scoring nothing, and a
real failure in a piece as its own one-line error, resumed on one machine. Marked `ray`: run with
`pytest -m ray`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sefusion.errors import SefusionError
from sefusion.study import gen_pieces
from sefusion.study.executor import LocalExecutor, RayExecutor
from sefusion.study.gen_study import GenStudy
from test_gen_study import (
    GEN_FIXTURE,
    PROBLEMS,
    assert_same,
    builder,
    canonical_tree,
    config,
    gen_canonical,
    one_thread,
)
from test_generative import problems  # noqa: F401 - a fixture
from test_study_ray import cluster, worker_path  # noqa: F401 - a fixture
from tiny_causal import make_causal

ray = pytest.importorskip("ray")
pytestmark = [
    pytest.mark.ray,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

BAD_DATA = "task generate-python: bad data on line 3 of test.jsonl"
PER_RUN = ("trained_this_run", "evaluations_this_run")  # what a resumed run counts of its own


class FailsOnWorkers:
    """The sandbox's run_all on the driver; on a Ray worker a real error (as bad data would raise) once
    the study has recorded something (the first pieces, the baselines, succeed)."""

    def __init__(self, records: Path) -> None:
        self.driver, self.records = os.getpid(), records

    def __call__(self, programs, **kw):
        if os.getpid() != self.driver and '"key"' in self.records.read_text():
            raise SefusionError(BAD_DATA)
        from sefusion.sandbox import run_all

        return run_all(programs, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, problems):  # noqa: F811
    PROBLEMS[:] = [problems[k] for k in ("area", "wrong", "plain", "double", "twice")]
    return make_causal(tmp_path_factory.mktemp("tiny") / "llama")


def run(tiny: Path, root: Path, executor, **kw) -> tuple[dict, str]:
    cfg = config(tiny, root / "out", root / "cache", quiet=True)
    with one_thread():
        results = GenStudy(cfg, builder=builder, executor=executor, **kw).run()
    return results, gen_canonical(results, cfg.out)


def scored_here(monkeypatch) -> list[str]:
    """The record keys this process (the driver) scores itself: none, when every piece runs on Ray."""
    seen: list[str] = []
    real = gen_pieces.evaluate
    monkeypatch.setattr(gen_pieces, "evaluate", lambda inputs, lm, tok, task, split: seen.append(task) or
                        real(inputs, lm, tok, task, split))  # fmt: skip
    return seen


def test_two_nodes_give_the_in_process_study(cluster, tiny, tmp_path, monkeypatch):  # noqa: F811
    here = scored_here(monkeypatch)
    results, canonical = run(tiny, tmp_path, RayExecutor(quiet=True))
    # rows, scores, records and adapters: the in-process study's
    assert_same(canonical_tree(canonical), canonical_tree(GEN_FIXTURE.read_text()))
    assert results["trained_this_run"] == [
        "summarize-python",
        "generate-python",
        "multitask_lora",
        "multitask_full",
    ]
    assert here == []  # the driver trained and scored nothing: every evaluation came back from a piece
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_a_real_failure_is_its_own_error_and_the_study_resumes_on_one_machine(cluster, tiny, tmp_path, capfd):  # noqa: F811
    runner = FailsOnWorkers(tmp_path / "out" / "records.jsonl")
    with pytest.raises(SefusionError) as err:
        run(tiny, tmp_path, RayExecutor(quiet=True), runner=runner)
    assert type(err.value) is SefusionError and str(err.value) == BAD_DATA  # the CLI's one line
    assert "Traceback" not in capfd.readouterr().err
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    recorded = [json.loads(line)["key"] for line in lines if '"key"' in line]
    assert "individual|{}|generate-python|test" in recorded  # the pieces finished before it are recorded
    results, canonical = run(tiny, tmp_path, LocalExecutor(quiet=True), runner=runner)
    assert results["trained_this_run"] == []  # the cluster trained them
    want = json.loads(GEN_FIXTURE.read_text())
    assert results["evaluations_this_run"] == want["evaluations_this_run"] - len(recorded)
    got = canonical_tree(canonical)
    assert_same(
        {k: v for k, v in got.items() if k not in PER_RUN},
        {k: v for k, v in canonical_tree(GEN_FIXTURE.read_text()).items() if k not in PER_RUN},
    )


def test_cli_an_address_nothing_answers_on_is_one_error_line_before_any_work(tiny, tmp_path):
    """In a process of its own (this module's is connected to the test cluster)."""
    env = {**os.environ, "PYTHONPATH": worker_path(), "SEFUSION_CACHE": str(tmp_path / "cache")}
    argv = ["gen-tasks", "--base", str(tiny), "--out", str(tmp_path / "o"), "--ray", "127.0.0.1:1", "-q"]
    run = subprocess.run(
        [sys.executable, "-m", "sefusion", "study", *argv], env=env, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr == "sefusion: error: cannot reach a Ray cluster at 127.0.0.1:1: Connection refused\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()  # refused before any work

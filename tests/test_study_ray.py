"""The toy study on a two-node Ray cluster simulated on this machine: the in-process rows, a worker killed
mid-study, a real failure as its own error and the resume on one machine. Marked `ray` (a cluster takes
~20 s to start here): run with `pytest -m ray`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sefusion
from sefusion.errors import SefusionError
from sefusion.study import run_study
from sefusion.study.executor import LocalExecutor, RayExecutor
from test_study import FakeModels, FakeTasks, _config
from test_study_pieces import FIXTURES, canonical, record_keys

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SMALL = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
REFERENCE = (FIXTURES / "study_toy_results.json").read_text()


class OnWorkers(FakeModels):
    """FakeModels that knows whether it scores on the driver or on a Ray worker; on a worker, the first
    validation scoring of `kill` writes its PID to `marker` and hangs (to be killed), and any scoring of
    `fail` raises a real error."""

    def __init__(self, root: Path, marker: Path | None = None, fail: str | None = None) -> None:
        super().__init__(root)
        self.driver, self.marker, self.fail = os.getpid(), marker, fail

    def evaluate(self, body, heads, data, split, spec, **kw):
        if os.getpid() != self.driver:
            if self.marker is not None and split == "validation" and not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                time.sleep(120)
            if self.fail is not None and data.task == self.fail:
                raise SefusionError(f"task {self.fail}: bad data on line 3 of test.jsonl")
        return super().evaluate(body, heads, data, split, spec, **kw)


def worker_path() -> str:
    """PYTHONPATH for Ray workers: sefusion and the tests' modules from where this process imports them."""
    old = os.environ.get("PYTHONPATH")
    paths = [str(Path(__file__).parent), str(Path(sefusion.__file__).parents[1])]
    return os.pathsep.join([*paths, *([old] if old else [])])


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = worker_path()
    c = Cluster(initialize_head=True, head_node_args={**SMALL, "include_dashboard": False})
    try:
        c.add_node(**SMALL)
        ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def study(tmp_path: Path, models: FakeModels, **cfg) -> str:
    executor = RayExecutor(quiet=True) if cfg.pop("ray", True) else LocalExecutor(quiet=True)
    results = run_study(_config(tmp_path, **cfg), models=models, tasks_api=FakeTasks(), executor=executor)
    return canonical(results, tmp_path / "report")


def test_two_nodes_give_the_in_process_rows(cluster, tmp_path):
    local = study(tmp_path / "local", FakeModels(tmp_path / "local" / "m"), ray=False)
    models = FakeModels(tmp_path / "ray" / "m")
    on_ray = study(tmp_path / "ray", models)
    assert on_ray == local == REFERENCE
    assert json.loads(on_ray)["rows"] == json.loads(local)["rows"]
    # the driver trained nothing (experts, heads, multitask and statistics ran on Ray) and scored the
    # baselines, the multitask row and the curve only: the candidates ran on Ray
    assert models.calls["finetune"] == models.calls["head_only"] == models.calls["statistics"] == 0
    assert models.calls["evaluate"] == 3 + 3 + 3 + 3
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_a_worker_killed_mid_study_is_retried_and_the_rows_do_not_change(cluster, tmp_path):
    marker = tmp_path / "pid"
    killed: list[int] = []

    def kill_when_ready():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.05)
        killed.append(int(marker.read_text()))
        os.kill(killed[0], signal.SIGKILL)  # a Ray worker this test's cluster started

    watcher = threading.Thread(target=kill_when_ready, daemon=True)
    watcher.start()
    out = study(tmp_path, OnWorkers(tmp_path / "m", marker=marker))
    watcher.join(5)
    assert killed and killed[0] != os.getpid()
    assert out == REFERENCE
    keys = record_keys(tmp_path / "m")
    assert len(keys) == len(set(keys)) == 156


def test_a_real_failure_is_its_own_error_and_the_study_resumes_on_one_machine(cluster, tmp_path, capfd):
    models = OnWorkers(tmp_path / "m", fail="beta-python")
    with pytest.raises(SefusionError) as err:
        study(tmp_path, models)
    assert type(err.value) is SefusionError
    assert str(err.value) == "task beta-python: bad data on line 3 of test.jsonl"  # the CLI's one line
    assert "Traceback" not in capfd.readouterr().err
    recorded = record_keys(tmp_path / "m")
    assert len(recorded) == 9  # the baselines, scored on the driver; no candidate scores beta-python
    before = models.calls["evaluate"]
    assert study(tmp_path, models, ray=False) == REFERENCE  # on one machine, from the cluster's records
    keys = record_keys(tmp_path / "m")
    assert len(keys) == len(set(keys)) == 156
    assert models.calls["evaluate"] - before == 156 - len(recorded)


def test_cli_an_address_nothing_answers_on_is_one_error_line_before_any_work(tmp_path):
    """In a process of its own (this module's is connected to the test cluster)."""
    env = {**os.environ, "PYTHONPATH": worker_path(), "SEFUSION_CACHE": str(tmp_path / "cache")}
    argv = ["study", "pair", "--out", str(tmp_path / "o"), "--ray", "127.0.0.1:1", "-q"]
    run = subprocess.run([sys.executable, "-m", "sefusion", *argv], env=env, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == "sefusion: error: cannot reach a Ray cluster at 127.0.0.1:1: Connection refused\n"
    assert not (tmp_path / "cache").exists()  # refused before any work

"""The executor on a two-node Ray cluster simulated on this machine: the in-process results, worker loss,
real failures. Marked `ray` (a cluster takes ~20 s to start here): run with `pytest -m ray`."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import dag_toy
import sefusion
from sefusion.errors import SefusionError
from sefusion.study.executor import LocalExecutor, Piece, RayExecutor

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SMALL = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


def worker_path() -> str:
    """PYTHONPATH for Ray workers: sefusion and dag_toy from where this process imports them."""
    old = os.environ.get("PYTHONPATH")
    paths = [str(Path(dag_toy.__file__).parent), str(Path(sefusion.__file__).parents[1])]
    return os.pathsep.join([*paths, *([old] if old else [])])


def test_without_an_address_a_local_instance_is_started_and_shut_down(monkeypatch, tmp_path):
    """`--ray` alone; first in this file, before the cluster fixture connects this process."""
    assert not ray.is_initialized()
    monkeypatch.setenv("PYTHONPATH", worker_path())
    # a local instance turns token authentication on (RAY_AUTH_MODE in this process's environment) and
    # saves a token under ~/.ray: keep both to this test (the setenv makes monkeypatch restore "unset")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "")
    monkeypatch.delenv("RAY_AUTH_MODE")
    out = RayExecutor(quiet=True, init_kwargs=SMALL).run(dag_toy.study())
    assert not ray.is_initialized()
    assert list(out.items()) == list(local(dag_toy.study()).items())


def test_an_address_nothing_answers_on_is_one_clear_error():
    with pytest.raises(
        SefusionError, match=r"^cannot reach a Ray cluster at 127.0.0.1:1: Connection refused$"
    ):
        RayExecutor(address="127.0.0.1:1", quiet=True).run(dag_toy.study())


@pytest.fixture(scope="module")
def cluster():
    """Two one-CPU nodes; workers import sefusion and dag_toy from where this process does."""
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


def local(pieces, **kw):
    return LocalExecutor(quiet=True).run(pieces, **kw)


def on_ray(pieces, **kw):
    return RayExecutor(quiet=True).run(pieces, **kw)


def test_two_nodes_give_the_local_results_in_the_same_order(cluster):
    ref = local(dag_toy.study())
    finished: list[str] = []
    out = on_ray(dag_toy.study(), on_done=lambda k, r: finished.append(k))
    assert list(out.items()) == list(ref.items())
    assert sorted(finished) == sorted(ref)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2


def test_a_worker_killed_mid_piece_is_retried_and_the_results_do_not_change(cluster, tmp_path):
    marker = tmp_path / "pid"
    pieces = [
        Piece(p.key, dag_toy.killable, (str(marker), p.fn, *p.args), deps=p.deps)
        if p.key == "cand/ta/0.5"
        else p
        for p in dag_toy.study()
    ]
    killed: list[int] = []

    def kill_when_ready():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.05)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)  # a Ray worker this test's cluster started
        killed.append(pid)

    watcher = threading.Thread(target=kill_when_ready, daemon=True)
    watcher.start()
    out = on_ray(pieces)
    watcher.join(5)
    assert killed, "the piece never started"
    assert list(out.items()) == list(local(dag_toy.study()).items())


def test_a_real_failure_fails_the_run_with_its_own_message_and_resumes_on_one_machine(cluster, capfd):
    records: dict = {}
    pieces = dag_toy.study()
    cut = [Piece(p.key, dag_toy.broken, deps=p.deps) if p.key == "choice/ta" else p for p in pieces]
    with pytest.raises(SefusionError) as err:
        on_ray(cut, on_done=records.__setitem__)
    assert type(err.value) is SefusionError
    assert str(err.value) == "task t1: bad data on line 3 of train.jsonl"  # the CLI's one line
    assert any(
        "raised by piece choice/ta on the Ray cluster" in n for n in getattr(err.value, "__notes__", [])
    )
    assert "Traceback" not in capfd.readouterr().err
    assert {"data/t0", "expert/t2", "cand/ta/0.8"} <= set(records) and "choice/ta" not in records
    recorded = dict(records)
    rerun: list[str] = []
    out = local(pieces, done=records.get, on_done=lambda k, r: rerun.append(k))
    assert out == local(pieces)
    assert set(rerun) == set(out) - set(recorded)


def test_a_run_cut_on_one_machine_resumes_on_the_cluster_without_running_a_piece_twice(cluster):
    records: dict = {}
    pieces = dag_toy.study()
    cut = [Piece(p.key, dag_toy.broken, deps=p.deps) if p.key == "cand/ties/0.2" else p for p in pieces]
    with pytest.raises(SefusionError):
        local(cut, on_done=records.__setitem__)
    recorded = dict(records)
    rerun: list[str] = []
    out = on_ray(pieces, done=records.get, on_done=lambda k, r: rerun.append(k))
    assert out == local(pieces)
    assert sorted(rerun) == sorted(set(out) - set(recorded))


def test_a_piece_no_node_can_hold_is_refused_before_anything_runs(cluster):
    pieces = [Piece("gen/0", dag_toy.data, ("t0", 0), num_gpus=1)]
    with pytest.raises(SefusionError, match=r"piece gen/0 needs 1 CPU\(s\) and 1 GPU\(s\) on one node"):
        on_ray(pieces)


def test_everything_recorded_needs_no_cluster():
    ref = local(dag_toy.study())
    assert RayExecutor(address="203.0.113.1:1").run(dag_toy.study(), done=ref.get) == ref

"""The executor on a two-node Ray cluster simulated on this machine: the in-process results, worker loss,
real failures. Marked `ray` (a cluster takes ~20 s to start here, the module ~65 s): run with `pytest -m ray`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
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


LOCAL_RUN = """
import json, ray, dag_toy
from sefusion.study.executor import RayExecutor
out = RayExecutor(quiet=True, init_kwargs={"num_cpus": 1, "object_store_memory": 80 * 2**20}).run(dag_toy.study())
print(json.dumps([list(out.items()), ray.is_initialized()]))
"""


def test_without_an_address_a_local_instance_is_started_and_shut_down(tmp_path):
    """`--ray` alone. In a process of its own: a local instance turns Ray's token authentication on in
    its process (and saves a token under ~/.ray, here a temporary HOME), which a later connection to
    the test cluster must not inherit."""
    env = {**os.environ, "PYTHONPATH": worker_path(), "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", LOCAL_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    items, still_connected = json.loads(run.stdout.splitlines()[-1])
    assert not still_connected
    assert [tuple(kv) for kv in items] == list(json.loads(json.dumps(local(dag_toy.study()))).items())


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
    assert RayExecutor(address="127.0.0.1:1").run(dag_toy.study(), done=ref.get) == ref


def test_a_random_dag_with_recorded_pieces_gives_the_reference_results(cluster):
    """Shared inputs, recorded inputs put once for many pieces, pieces listed out of dependency order."""
    rnd = random.Random(7)
    n = 40
    deps = [rnd.sample(range(i), min(i, rnd.randint(0, 4))) for i in range(n)]
    ref: dict[str, str] = {}
    for i, ds in enumerate(deps):
        ref[f"k{i}"] = dag_toy.mix(f"k{i}", *(ref[f"k{j}"] for j in ds))
    order = rnd.sample(range(n), n)
    pieces = [Piece(f"k{i}", dag_toy.mix, (f"k{i}",), deps=tuple(f"k{j}" for j in deps[i])) for i in order]
    recorded = {f"k{i}": ref[f"k{i}"] for i in rnd.sample(range(n), 12)}
    ran: list[str] = []
    out = on_ray(pieces, done=recorded.get, on_done=lambda k, r: ran.append(k))
    assert list(out.items()) == [(p.key, ref[p.key]) for p in pieces]
    assert sorted(ran) == sorted(set(ref) - set(recorded))

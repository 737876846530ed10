"""The study's DAG executor in process: dependency order, skipping recorded pieces, failures, determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dag_toy
from sefusion.errors import SefusionError
from sefusion.study.executor import LocalExecutor, Piece, Plan, RayExecutor, make_executor


def run_local(pieces, **kw):
    return LocalExecutor(quiet=True).run(pieces, **kw)


def by_hand() -> dict:
    """The toy study computed directly, without any executor: the reference the executors must meet."""
    out: dict = {}
    for t in ("t0", "t1", "t2"):
        out[f"data/{t}"] = dag_toy.data(t, 0)
    for t in ("t0", "t1", "t2"):
        out[f"expert/{t}"] = dag_toy.expert(t, 0.5, out[f"data/{t}"])
    experts = [out[f"expert/{t}"] for t in ("t0", "t1", "t2")]
    for m in ("ta", "ties"):
        cands = [dag_toy.candidate(m, lam, *experts) for lam in (0.2, 0.5, 0.8)]
        out.update({f"cand/{m}/{c['lam']}": c for c in cands})
        out[f"choice/{m}"] = dag_toy.choose(m, *cands)
    return out


def test_toy_study_matches_the_hand_computation_in_order():
    assert list(run_local(dag_toy.study()).items()) == list(by_hand().items())


def test_pieces_run_in_the_given_order_where_deps_allow():
    seen: list[str] = []

    def note(key, *deps):
        seen.append(key)
        return key

    pieces = [
        Piece("c", note, ("c",), deps=("a", "b")),
        Piece("a", note, ("a",)),
        Piece("b", note, ("b",), deps=("a",)),
        Piece("d", note, ("d",)),
    ]
    assert run_local(pieces) == {"c": "c", "a": "a", "b": "b", "d": "d"}
    assert seen == ["a", "b", "c", "d"]


def test_dependency_results_follow_the_args_in_deps_order():
    pieces = [
        Piece("x", lambda: 2),
        Piece("y", lambda: 3),
        Piece(
            "z", lambda k, a, b, scale: k * (10 * a + b) * scale, (1,), deps=("y", "x"), kwargs={"scale": 2}
        ),
    ]
    assert run_local(pieces)["z"] == 64


def test_done_pieces_are_skipped_and_their_recorded_result_used():
    ran: list[str] = []
    ref = by_hand()
    recorded = {k: v for k, v in ref.items() if k.startswith(("data/", "cand/ta/"))}

    def on_done(key, result):
        ran.append(key)

    out = run_local(dag_toy.study(), done=recorded.get, on_done=on_done)
    assert out == ref
    assert set(ran) == set(ref) - set(recorded)
    assert not set(ran) & set(recorded)


def test_a_run_cut_by_a_failure_resumes_without_running_a_piece_twice():
    records: dict = {}
    pieces = dag_toy.study()
    cut = [p if p.key != "cand/ties/0.5" else Piece(p.key, dag_toy.broken, deps=p.deps) for p in pieces]
    with pytest.raises(SefusionError, match=r"^task t1: bad data on line 3 of train.jsonl$"):
        run_local(cut, on_done=records.__setitem__)
    assert "cand/ties/0.5" not in records and "cand/ta/0.8" in records
    first = dict(records)
    rerun: list[str] = []
    out = run_local(pieces, done=records.get, on_done=lambda k, r: rerun.append(k))
    assert out == by_hand()
    assert set(rerun) == set(by_hand()) - set(first)


def test_the_piece_error_is_raised_as_is():
    class Odd(Exception):
        pass

    def boom():
        raise Odd("exactly this")

    with pytest.raises(Odd, match="^exactly this$"):
        run_local([Piece("a", lambda: 1), Piece("b", boom, deps=())])


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ([Piece("a", int), Piece("a", int)], "two pieces have the key 'a'"),
        ([Piece("a", int, deps=("b",))], "piece 'a' depends on unknown piece(s) 'b'"),
        (
            [Piece("a", int, deps=("c",)), Piece("b", int, deps=("a",)), Piece("c", int, deps=("b",))],
            "pieces depend on each other in a cycle: 'a', 'b', 'c'",
        ),
    ],
)
def test_malformed_dags_are_refused_before_anything_runs(pieces, message):
    with pytest.raises(ValueError) as err:
        run_local(pieces)
    assert str(err.value) == message


def test_a_piece_returning_none_is_refused():
    with pytest.raises(TypeError, match="piece a returned None"):
        run_local([Piece("a", lambda: None)])


def test_progress_bar_counts_done_running_waiting(capsys):
    done = {"data/t0": dag_toy.data("t0", 0)}
    LocalExecutor(desc="toy").run(dag_toy.study(), done=done.get)
    err = capsys.readouterr().err
    assert "toy:   7%|" in err and "1/14" in err  # the recorded piece counts as done from the start
    assert "running 1, waiting 12" in err and "14/14" in err and "running 0, waiting 0" in err


def test_a_session_with_a_total_keeps_one_bar_over_its_runs(capsys):
    """Two runs (14 pieces, then 3) under one announced total of 17: one bar, which counts the second
    run's pieces as waiting during the first and ends at 17/17."""
    ex = LocalExecutor(desc="first")
    with ex.session(total=17):
        ex.run(dag_toy.study())
        ex.desc = "second"
        ex.run(
            [Piece("x", lambda: 1), Piece("y", lambda: 2), Piece("z", lambda a, b: a + b, deps=("x", "y"))]
        )
    err = capsys.readouterr().err
    assert "running 1, waiting 16" in err and "first: 100%" not in err  # the 3 to come are waiting
    assert "14/17" in err and "second: 100%" in err and "17/17" in err
    assert "/14 " not in err and "/3 " not in err  # no bar of a run's own


def test_a_session_that_announced_too_few_grows_its_total(capsys):
    ex = LocalExecutor(desc="toy")
    with ex.session(total=2):
        ex.run(dag_toy.study())
    err = capsys.readouterr().err
    assert "14/14" in err and "running 0, waiting 0" in err


def test_make_executor_maps_the_ray_flag():
    assert isinstance(make_executor(None), LocalExecutor)
    assert make_executor(True).address is None and make_executor("").address is None
    assert make_executor("127.0.0.2:6379").address == "127.0.0.2:6379"


def test_the_ray_executor_without_ray_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is not installed
    with pytest.raises(SefusionError, match=r"pip install 'sefusion\[ray\]'"):
        RayExecutor().run(dag_toy.study())


def test_nothing_imports_ray_without_the_ray_executor():
    code = "import sys, sefusion.cli, sefusion.study.executor; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@st.composite
def dags(draw):
    """A random DAG (deps only on earlier nodes), listed in a random order, with a random set recorded."""
    n = draw(st.integers(1, 14))
    deps = [draw(st.lists(st.integers(0, i - 1), unique=True, max_size=4)) if i else [] for i in range(n)]
    order = draw(st.permutations(range(n)))
    pieces = [Piece(f"k{i}", dag_toy.mix, (f"k{i}",), deps=tuple(f"k{j}" for j in deps[i])) for i in order]
    recorded = draw(st.sets(st.integers(0, n - 1)))
    return pieces, deps, [f"k{i}" for i in recorded]


def reference(deps: list[list[int]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, ds in enumerate(deps):  # nodes are numbered in a topological order
        out[f"k{i}"] = dag_toy.mix(f"k{i}", *(out[f"k{j}"] for j in ds))
    return out


@settings(max_examples=80, deadline=None)
@given(dags())
def test_random_dags_give_the_reference_results_whatever_the_order_and_records(dag):
    pieces, deps, recorded = dag
    ref = reference(deps)
    ran: list[str] = []
    out = run_local(pieces, done={k: ref[k] for k in recorded}.get, on_done=lambda k, r: ran.append(k))
    assert list(out) == [p.key for p in pieces]
    assert out == ref
    assert sorted(ran) == sorted(set(ref) - set(recorded))


@settings(max_examples=80, deadline=None)
@given(dags(), st.randoms(use_true_random=False))
def test_plan_in_any_completion_order_starts_pieces_only_after_their_inputs(dag, rnd):
    """What the Ray executor does: many running at once, finishing in any order."""
    pieces, deps, recorded = dag
    ref = reference(deps)
    plan = Plan(pieces, {k: ref[k] for k in recorded}.get)
    running: list[Piece] = []
    started: list[str] = []
    while not plan.finished:
        for p in plan.pop_ready(limit=rnd.randint(1, 3)):
            assert all(d in plan.results for d in p.deps)
            started.append(p.key)
            running.append(p)
        assert running, "the plan stalled"
        p = running.pop(rnd.randrange(len(running)))
        plan.finish(p.key, p(*(plan.results[d] for d in p.deps)))
        assert sum(plan.counts()) == len(pieces)
    assert sorted(started) == sorted(set(ref) - set(recorded))
    assert plan.ordered() == {p.key: ref[p.key] for p in pieces}


def test_the_heap_is_trimmed_after_a_piece_that_grew_the_process_before_the_next_starts(monkeypatch):
    from sefusion.study import executor

    mb = 1 << 20
    events: list[str] = []
    sizes = iter([None, 1000 * mb, 1200 * mb, 900 * mb, 1500 * mb, 300 * mb])
    monkeypatch.setattr(executor, "private_resident_bytes", lambda: next(sizes))
    monkeypatch.setattr(executor, "release_freed_memory", lambda: events.append("trim"))
    monkeypatch.setattr(executor, "after_piece", executor._HeapTrim())
    monkeypatch.setattr(executor, "TRIM_GROWTH", 512 * mb)

    def note(key, *deps):
        events.append(key)
        return key

    # a trims (nothing measured yet; the floor is then 1000 MB); b grew less than 512 MB; c shrank (the
    # floor follows it down to 900 MB), so d, 600 MB above c but not above a, trims
    pieces = [Piece("a", note, ("a",)), Piece("b", note, ("b",), deps=("a",)), Piece("c", note, ("c",))]
    run_local(pieces)
    assert events == ["a", "trim", "b", "c"]
    assert executor._call(note, ("d",), {}) == "d" and events[-2:] == ["d", "trim"]  # a Ray worker's piece


def test_pieces_that_each_grow_the_process_a_little_trim_once_they_add_up(monkeypatch):
    from sefusion.study import executor

    mb, events = 1 << 20, []
    sizes = iter([1000 * mb, 1000 * mb, 1400 * mb, 1800 * mb, 700 * mb])
    monkeypatch.setattr(executor, "private_resident_bytes", lambda: next(sizes))
    monkeypatch.setattr(executor, "release_freed_memory", lambda: events.append("trim"))
    monkeypatch.setattr(executor, "TRIM_GROWTH", 512 * mb)
    trim = executor._HeapTrim()
    for _ in range(3):
        trim()
    # the first trims (floor 1000 MB); +400 MB does not; +800 MB over the floor, in two steps, does
    assert events == ["trim", "trim"] and trim.floor == 700 * mb


def test_a_trim_happens_after_every_piece_where_resident_memory_is_unknown(monkeypatch):
    from sefusion.study import executor

    events: list[str] = []
    monkeypatch.setattr(executor, "private_resident_bytes", lambda: None)
    monkeypatch.setattr(executor, "release_freed_memory", lambda: events.append("trim"))
    monkeypatch.setattr(executor, "after_piece", executor._HeapTrim())

    def note(key):
        events.append(key)
        return key

    run_local([Piece("a", note, ("a",)), Piece("b", note, ("b",))])
    assert events == ["a", "trim", "b", "trim"]

"""The sandbox: each harmful program fails alone, the host is untouched, and each limit is what stops it.

Every case has a control: the same program with that one limit or mechanism removed does the damage
(on things the test owns), so the case would fail if the limit were gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sefusion import sandbox
from sefusion.sandbox import Limits, run, run_all

SMALL = Limits(timeout_s=2.0, memory_mb=256, processes=16, output_bytes=100_000)


def granted(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if sandbox.mechanisms().get(n) is not None]
    return pytest.mark.skipif(bool(missing), reason=f"this machine does not grant {missing}")


def without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """The sandbox as on a machine lacking these mechanisms (the control of a case)."""
    found = {**sandbox.mechanisms(), **dict.fromkeys(names, "removed by the test")}
    monkeypatch.setattr(sandbox, "mechanisms", lambda: found)


@pytest.fixture
def uids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The uids this test's programs ran as (other processes on the machine may use the sandbox too)."""
    used: list[int] = []
    take = sandbox._next_uid

    def recorded() -> int:
        used.append(take())
        return used[-1]

    monkeypatch.setattr(sandbox, "_next_uid", recorded)
    return used


def processes_of(uids: list[int]) -> list[int]:
    """Host pids running as one of `uids`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            uid_line = next(x for x in (entry / "status").read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) in uids:
            pids.append(int(entry.name))
    return pids


def assert_no_leftovers(uids: list[int] | None = None, marker: str | None = None) -> None:
    """No process of these uids (or whose command line holds `marker`) outlives its run."""
    assert uids or marker
    deadline = time.monotonic() + 3
    while True:
        left = processes_of(uids) if uids else pids_with(marker)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []


def pids_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


def still_runs() -> None:
    """The run goes on: a following program passes."""
    assert run("print('fine')", limits=SMALL).status == "passed"


def test_exit_status_is_the_verdict() -> None:
    ok, bad, exits = (
        run(p, limits=SMALL) for p in ("x = 1", "assert 1 == 2, 'wrong'", "raise SystemExit(3)")
    )
    assert ok.status == "passed" and ok.passed
    assert bad.status == "failed" and not bad.passed and "AssertionError: wrong" in bad.detail
    assert "program.py" in bad.detail and "sefusion-sandbox" not in bad.detail  # no host path in detail
    assert exits.status == "failed"


def test_a_program_that_does_not_compile_is_an_error_with_its_message() -> None:
    out = run("def f(:\n    pass\n", limits=SMALL)
    assert out.status == "error" and "does not compile: SyntaxError" in out.detail and "line 1" in out.detail


def test_clean_environment_own_directory_and_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEFUSION_TEST_SECRET", "leaked")
    prog = (
        "import os, sys\n"
        "assert set(os.environ) <= {'PATH', 'LANG', 'HOME', 'TMPDIR', 'LC_CTYPE'}, sorted(os.environ)\n"
        "assert os.environ['HOME'] == os.getcwd() and os.listdir('.') == []\n"
        "open('own.txt', 'w').write('x' * 1000); os.mkdir('d'); os.remove('own.txt')\n"
        "assert sys.flags.isolated\n"
        f"assert os.getuid() != 0 or {os.geteuid() != 0}\n"
    )
    assert run(prog, limits=SMALL).status == "passed"


def test_infinite_loop_times_out_alone() -> None:
    start = time.monotonic()
    out = run("while True:\n    pass\n", limits=Limits(timeout_s=0.5))
    assert out.status == "timeout" and not out.passed and time.monotonic() - start < 5
    out = run("import time\ntime.sleep(60)\n", limits=Limits(timeout_s=0.5))  # no CPU: the wall clock
    assert out.status == "timeout" and out.wall_s < 6
    still_runs()


def test_the_wall_limit_is_what_stops_the_loop() -> None:
    prog = "import time\nend = time.time() + 1.0\nwhile time.time() < end:\n    pass\n"
    assert run(prog, limits=Limits(timeout_s=0.3)).status == "timeout"
    assert run(prog, limits=Limits(timeout_s=8.0)).status == "passed"  # control: it ends by itself


@granted("namespaces")
def test_the_whole_process_tree_dies_with_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"{time.time_ns() % 10**6}.271828"  # a sleep only this test starts
    prog = (
        "import os, subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"  # leaves the process group
        f"subprocess.Popen(['sleep', '{marker}'])\n"
    )
    assert run(prog, limits=SMALL).status == "passed"
    assert_no_leftovers(marker=marker)
    without(monkeypatch, "namespaces")  # control: only the process group is killed, the escaped one lives
    run(prog, limits=SMALL)
    time.sleep(1.0)  # the killed one is gone by then
    escaped = pids_with(marker)
    for pid in escaped:
        os.kill(pid, signal.SIGKILL)
    assert len(escaped) == 1


def test_unbounded_allocation_is_a_memory_failure() -> None:
    grow = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**6))\n"
    out = run(grow, limits=Limits(timeout_s=20, memory_mb=256))
    assert out.status == "memory" and "MemoryError" in out.detail and "256 MB" in out.detail
    one = "x = bytearray(600 * 2**20)\nx[-1] = 1\n"
    assert run(one, limits=Limits(timeout_s=20, memory_mb=256)).status == "memory"
    assert run(one, limits=Limits(timeout_s=20, memory_mb=2048)).status == "passed"  # control
    still_runs()


FORKS = (
    "import os, time\nchildren = 0\nfor _ in range(40):\n"
    "    if os.fork() == 0:\n        time.sleep(1)\n        os._exit(0)\n    children += 1\n"
    "print(children)\n"
)


@granted("uid")
def test_the_process_limit_stops_forking(uids: list[int]) -> None:
    out = run(FORKS, limits=Limits(timeout_s=10, processes=16))
    assert out.status == "failed" and "BlockingIOError" in out.detail
    assert run(FORKS, limits=Limits(timeout_s=10, processes=64)).status == "passed"  # control
    assert_no_leftovers(uids)


@granted("uid", "namespaces")
def test_fork_bomb_fails_alone_and_leaves_nothing(uids: list[int]) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    out = run(bomb, limits=Limits(timeout_s=1.0, processes=16))
    assert out.status in ("timeout", "failed") and not out.passed
    assert_no_leftovers(uids)
    still_runs()


@pytest.fixture
def open_dir(tmp_path: Path) -> Path:
    """A folder the test owns that any user may write (so only the sandbox can stop a write)."""
    target = tmp_path / "shared"
    target.mkdir()
    target.chmod(0o777)
    (target / "keep.txt").write_text("original")
    (target / "keep.txt").chmod(0o666)
    return target


def write_outside(target: Path) -> str:
    return (
        "import os\n"
        f"os.chdir({str(target)!r})\n"
        "for step in (lambda: open('keep.txt', 'w').write('overwritten'),\n"
        "             lambda: open('new.txt', 'w').write('x'),\n"
        "             lambda: os.mkdir('newdir'), lambda: os.remove('keep.txt'),\n"
        "             lambda: os.symlink('/etc/passwd', 'link')):\n"
        "    try:\n        step()\n    except OSError as exc:\n        print(exc)\n        failed = True\n"
        "assert 'failed' not in dir()\n"
    )


@granted("landlock-fs")
def test_writes_outside_its_directory_are_refused(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(write_outside(open_dir), limits=SMALL)
    assert out.status == "failed"
    assert sorted(p.name for p in open_dir.iterdir()) == ["keep.txt"]
    assert (open_dir / "keep.txt").read_text() == "original"
    still_runs()
    without(monkeypatch, "landlock-fs")  # control: the folder is writable by anyone but the sandbox
    assert run(write_outside(open_dir), limits=SMALL).status == "passed"
    assert (open_dir / "new.txt").exists()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    yield server
    server.close()


def connect_to(port: int) -> str:
    return (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'hello from the sandbox')\ns.close()\n"
    )


def accepted(server: socket.socket) -> bytes | None:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return None
    with conn:
        conn.settimeout(2)
        return conn.recv(100)


@granted("namespaces", "landlock-net")
def test_no_network_even_to_loopback(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    out = run(connect_to(port), limits=SMALL)
    assert out.status == "failed" and ("Error" in out.detail)
    assert accepted(listener) is None
    still_runs()
    # control: with the network allowed the same program reaches the test's listener
    assert run(connect_to(port), limits=Limits(timeout_s=5, network=True)).status == "passed"
    assert accepted(listener) == b"hello from the sandbox"


@granted("namespaces")
def test_network_namespace_alone_blocks_it(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "landlock-net")
    assert run(connect_to(listener.getsockname()[1]), limits=SMALL).status == "failed"
    assert accepted(listener) is None


def kill_others(victim: int) -> str:
    return (
        "import os, signal\n"
        f"os.kill({victim}, signal.SIGKILL)\n"
        f"os.killpg({victim}, signal.SIGKILL)\n"
        "os.kill(os.getppid(), signal.SIGKILL) if os.getppid() > 1 else None\n"
    )


@granted("namespaces", "uid", "landlock-scope")
def test_it_cannot_kill_its_parent_or_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a process the test owns
    try:
        run("import os, signal\nos.killpg(0, signal.SIGKILL)\n", limits=SMALL)  # its own group only
        still_runs()
        out = run(kill_others(victim.pid), limits=SMALL)
        assert out.status == "failed" and victim.poll() is None
        outcomes = run_all([kill_others(victim.pid), "print(1)"], limits=SMALL, workers=2)
        assert [o.status for o in outcomes] == ["failed", "passed"] and victim.poll() is None
        # control: without the PID namespace, the uid and Landlock's signal scope, the victim dies
        without(monkeypatch, "namespaces", "uid", "landlock-scope")
        run(kill_others(victim.pid), limits=SMALL)
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


@granted("landlock-scope")
def test_signal_scope_alone_protects_the_victim(monkeypatch: pytest.MonkeyPatch) -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        without(monkeypatch, "namespaces", "uid")
        assert run(kill_others(victim.pid), limits=SMALL).status == "failed" and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_huge_output_fails_alone() -> None:
    flood = "while True:\n    print('x' * 1000)\n"
    out = run(flood, limits=SMALL)
    assert out.status == "failed" and "output limit 100000 bytes exceeded" in out.detail
    errors = "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n"
    out = run(errors, limits=SMALL)
    assert out.status == "failed" and len(out.detail) <= 2000
    big_file = "open('big', 'wb').write(b'z' * 200_000)\n"
    assert run(big_file, limits=SMALL).status == "failed"
    # control: the same amount of output under a larger limit passes
    assert run("print('x' * 150_000)\n", limits=SMALL).status == "failed"
    assert run("print('x' * 150_000)\n", limits=Limits(timeout_s=5, output_bytes=200_000)).status == "passed"
    still_runs()


@granted("namespaces")
def test_the_files_it_writes_are_bounded_together() -> None:
    fill = "for i in range(30):\n    open(f'f{i}', 'wb').write(b'z' * 90_000)\n"  # each under the file limit
    out = run(fill, limits=Limits(timeout_s=5, output_bytes=100_000, disk_mb=1))
    assert out.status == "failed" and "No space left on device" in out.detail
    assert (
        run(fill, limits=Limits(timeout_s=5, output_bytes=100_000, disk_mb=8)).status == "passed"
    )  # control


def test_run_all_keeps_order_and_one_bad_program_fails_alone() -> None:
    programs = ["print(1)", "while True:\n    pass\n", "assert False", "x = bytearray(10**9)", "print(2)"]
    # 2 s: time for `python -I` to start on a loaded machine; the endless loop still runs into it
    statuses = [o.status for o in run_all(programs, limits=Limits(timeout_s=2.0, memory_mb=256), workers=2)]
    assert statuses == ["passed", "timeout", "failed", "memory", "passed"]
    assert run_all([], limits=SMALL) == []


def test_run_all_runs_one_program_per_core_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    barrier = threading.Barrier(cores, timeout=10)  # broken unless `cores` programs run at the same time

    def fake_run(program: str, *, limits: Limits) -> str:
        barrier.wait()
        return program

    monkeypatch.setattr(sandbox, "run", fake_run)
    programs = [f"p{i}" for i in range(3 * cores)]
    assert run_all(programs, limits=SMALL) == programs


def test_an_interrupt_stops_the_run_and_its_programs(uids: list[int]) -> None:
    sent: list[float] = []

    def interrupt() -> None:  # Ctrl-C once both workers' programs run (a loaded machine starts them late)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(uids) < 2 or not processes_of(uids)):
            time.sleep(0.05)
        sent.append(time.monotonic())
        # to the main thread itself: its blocking wait is then interrupted whichever thread runs
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # no earlier test replaced it
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_all(["import time\ntime.sleep(60)\n"] * 6, limits=Limits(timeout_s=60), workers=2)
    assert time.monotonic() - sent[0] < 10 and len(uids) == 2  # the four waiting never started
    assert_no_leftovers(uids)


def test_a_missing_mechanism_is_one_warning_line(monkeypatch, caplog) -> None:  # noqa: ANN001
    reply = '{"rlimits": null, "namespaces": "Operation not permitted", "uid": null, "landlock-fs": null, '
    reply += '"landlock-net": null, "landlock-scope": null}'
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=reply, stderr="")
    )
    found = sandbox.mechanisms.__wrapped__()
    assert found["namespaces"] == "Operation not permitted" and found["landlock-fs"] is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sefusion: warning: sandbox without namespaces (Operation not permitted): programs can reach the "
        "network and see other processes"
    ]


def test_probe_reports_every_mechanism() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(sandbox.JAIL), "--probe"], capture_output=True, text=True
    )
    assert set(json.loads(out.stdout)) == {
        "rlimits",
        "namespaces",
        "uid",
        "landlock-fs",
        "landlock-net",
        "landlock-scope",
    }


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
@granted("landlock-fs", "landlock-net")
def test_a_process_without_privileges_degrades_with_warnings(open_dir: Path) -> None:
    """Root without CAP_SETUID/CAP_SYS_ADMIN (a restricted container): namespaces come from a user
    namespace, the uid drop is refused with one warning line, Landlock still stops writes and TCP."""
    script = (
        "import logging, sys\nlogging.basicConfig(format='%(message)s')\n"
        "from sefusion.sandbox import Limits, mechanisms, run\n"
        f"progs = ['print(1)', {write_outside(open_dir)!r}, {connect_to(9)!r}]\n"
        "print(mechanisms()['uid'] is not None, [run(p, limits=Limits(timeout_s=5)).status for p in progs])\n"
    )
    cmd = [
        "setpriv",
        "--bounding-set=-setuid,-setgid,-sys_admin",
        "--inh-caps=-all",
        sys.executable,
        "-c",
        script,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "True ['passed', 'failed', 'failed']", done.stderr
    assert done.stderr.strip().splitlines() == [
        "sefusion: warning: sandbox without uid (Operation not permitted): programs run as the calling user "
        "and share its process limit"
    ]
    assert sorted(p.name for p in open_dir.iterdir()) == ["keep.txt"]

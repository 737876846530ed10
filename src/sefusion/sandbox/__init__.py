"""Run untrusted Python programs (generated code and its tests), each confined in a child process.

Each program runs as `python -I` in a throwaway working directory, with a clean environment, under
resource limits (address space, CPU seconds, processes, bytes per written file, stdout and stderr
included) and a wall-time limit after which its whole process group is killed. The kernel confines it
where this machine allows (see `mechanisms()`): new network, IPC and PID namespaces (no network, no other
process visible; the namespace dies with its first process), an unprivileged uid of its own (its
process limit is its own, it cannot signal the caller), and Landlock (writes only beneath its working
directory, no TCP, no signals outside its domain). A mechanism the machine refuses is reported once as
a warning and the others still apply.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import SefusionError

log = logging.getLogger("sefusion")

JAIL = Path(__file__).with_name("_jail.py")
STATUSES = ("passed", "failed", "timeout", "memory", "error")
UID_BASE, UID_SPAN = 1_700_000, 50_000  # unprivileged uids no account uses; one per running program
START_S = 0.5  # added to the wall limit: the interpreter's and the jail's start-up
CONFINE_FAILED = 125  # the jail's exit code when it could not confine the program


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 3072
    processes: int = 64
    output_bytes: int = 1_000_000  # per file the program writes, its stdout and stderr included
    network: bool = False
    disk_mb: int = 128  # all the files in its directory together (a tmpfs, where namespaces are granted)


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES
    detail: str  # last lines of stderr (or why it did not run), truncated
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def mechanisms() -> dict[str, str | None]:
    """Each confinement mechanism -> None when this machine grants it, else why not (warned once)."""
    if not sys.platform.startswith("linux"):
        raise SefusionError(f"the sandbox that runs generated code needs Linux (this is {sys.platform})")
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-S", str(JAIL), "--probe"], capture_output=True, text=True, timeout=30
        )
        found = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        found = dict.fromkeys(
            ("namespaces", "uid", "landlock-fs", "landlock-net", "landlock-scope"), str(exc)
        )
        found["rlimits"] = None
    for name, why in found.items():
        if why is not None:
            log.warning("sefusion: warning: sandbox without %s (%s): %s", name, why, _WEAKER[name])
    return found


_WEAKER = {
    "namespaces": "programs can reach the network and see other processes",
    "uid": "programs run as the calling user and share its process limit",
    "landlock-fs": "programs can write wherever the user can",
    "landlock-net": "TCP is blocked only by the network namespace",
    "landlock-scope": "signals are blocked only by the uid and PID namespace",
    "rlimits": "programs are not limited in memory, CPU or processes",
}

_uids = itertools.count(random.randrange(UID_SPAN))  # two processes running programs rarely share one
_uids_lock = threading.Lock()


def _next_uid() -> int:
    with _uids_lock:
        return UID_BASE + next(_uids) % UID_SPAN


def _config(limits: Limits, run_dir: Path, program: Path, uid: int) -> dict:
    granted = [name for name, why in mechanisms().items() if why is None]
    if limits.network:
        granted = [name for name in granted if name != "landlock-net"]
    return {
        "workdir": str(run_dir / "work"),
        "program": str(program),
        "python": sys.executable,
        "uid": uid,
        "memory_mb": limits.memory_mb,
        "cpu_s": math.ceil(limits.timeout_s) + 1,
        "processes": limits.processes,
        "file_bytes": limits.output_bytes,
        "disk_mb": limits.disk_mb,
        "network": limits.network,
        "mechanisms": granted,
    }


def _prepare(program: str, run_dir: Path, uid: int) -> Path:
    """run_dir (the caller's) holds the program and its output files; run_dir/work is the program's own."""
    work = run_dir / "work"
    work.mkdir()
    path = run_dir / "program.py"
    path.write_text(program, encoding="utf-8")
    if os.geteuid() == 0:
        os.chown(work, uid, uid)
        os.chmod(run_dir, 0o711)  # the uid may pass through to its own dir, nothing more
    return path


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, limit: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - limit))
        return f.read().decode("utf-8", "replace").strip()


def _classify(code: int, timed_out: bool, err: str, out_size: int, limits: Limits) -> tuple[str, str]:
    if timed_out or code == 128 + signal.SIGXCPU:
        return "timeout", f"killed after {limits.timeout_s:g} s" + (f"\n{err}" if err else "")
    if code == CONFINE_FAILED and err.startswith("sandbox:"):
        return "error", err
    if code == 0:
        return "passed", err
    if err.rsplit("\n", 1)[-1].startswith("MemoryError"):
        return "memory", f"memory limit {limits.memory_mb} MB\n{err}"
    if out_size >= limits.output_bytes:
        return "failed", f"output limit {limits.output_bytes} bytes exceeded\n{err}"
    if code > 128:
        return "failed", f"killed by signal {signal.Signals(code - 128).name}\n{err}".strip()
    return "failed", err


def _does_not_compile(program: str) -> str | None:
    try:
        compile(program, "program.py", "exec")
    except (SyntaxError, ValueError) as exc:
        return f"does not compile: {type(exc).__name__}: {exc}"
    return None


_running: set[subprocess.Popen] = set()  # every jail started and not yet reaped, for an interrupt
_running_lock = threading.Lock()


def _execute(cfg: str, run_dir: Path, timeout: float) -> tuple[int, bool]:
    """(the jail's return code, whether it ran out of time); its process group is gone after."""
    with open(run_dir / "stdout", "wb") as out, open(run_dir / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(JAIL), cfg], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            cwd=run_dir, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
        )  # fmt: skip
    with _running_lock:
        _running.add(proc)
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)  # whatever it left behind in its group goes with it
        with _running_lock:
            _running.discard(proc)
    return proc.returncode, timed_out


def _stop_running() -> None:
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run(program: str, *, limits: Limits = Limits()) -> Outcome:  # noqa: B008 - frozen dataclass
    """Run the Python program text confined; exit status 0 is "passed"."""
    start = time.perf_counter()
    why = _does_not_compile(program)
    if why:
        return Outcome("error", why, 0.0)
    uid = _next_uid()
    with tempfile.TemporaryDirectory(prefix="sefusion-sandbox-") as tmp:
        run_dir = Path(tmp)
        path = _prepare(program, run_dir, uid)
        cfg = json.dumps(_config(limits, run_dir, path, uid))
        code, timed_out = _execute(cfg, run_dir, limits.timeout_s + START_S)
        code = 128 - code if code < 0 else code
        out_size = os.path.getsize(run_dir / "stdout")
        err = _tail(run_dir / "stderr").replace(f"{run_dir}/", "")
        status, detail = _classify(code, timed_out, err, out_size, limits)
    return Outcome(status, detail[-2000:], time.perf_counter() - start)


def run_all(
    programs: Sequence[str],
    *,
    limits: Limits = Limits(),  # noqa: B008 - frozen dataclass
    workers: int | None = None,
    desc: str | None = None,
) -> list[Outcome]:
    """run() each program, in order, `workers` at a time (default: one per core it may use); a tqdm bar
    when `desc`."""
    mechanisms()  # probe (and warn) once, before the threads
    workers = workers or len(os.sched_getaffinity(0))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = pool.map(lambda p: run(p, limits=limits), programs)
        if desc is not None:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(programs), desc=desc, unit="program")
        return list(results)
    except BaseException:  # Ctrl-C, SIGTERM: nothing more starts, what runs is killed
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_running()
        raise
    finally:
        pool.shutdown(wait=True)

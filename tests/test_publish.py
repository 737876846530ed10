"""Publishing an output: folder modes, leftovers of killed runs, concurrent replacement, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import read_folder, write_folder, write_recipe
from sefusion.io import atomic_dir
from sefusion.io.publish import clean_stale, discard, make_tmp

SRC = str(Path(__file__).resolve().parents[1] / "src")


def siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "made").mkdir()
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        out = tmp_path / "out"
        assert out.stat().st_mode & 0o777 == (tmp_path / "made").stat().st_mode & 0o777 == 0o777 & ~umask
        with atomic_dir(out, overwrite=True) as tmp:  # --overwrite keeps the mode a user's folder gets
            (tmp / "g").write_text("y")
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask
        assert (out / "g").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


def test_merged_model_files_are_readable_by_others(toy, tmp_path):
    from sefusion.cli import main

    env = toy()
    p = env["paths"]
    recipe = write_recipe(tmp_path / "r.yaml", method="ties", base=str(p["base"]),
                          models=[{"path": str(p["e0"])}, {"path": str(p["e1"])}])  # fmt: skip
    old = os.umask(0o022)
    try:
        assert main(["merge", str(recipe), str(tmp_path / "out"), "-q"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_stale_leftover_is_removed_and_said_live_one_kept(tmp_path, caplog):
    out = tmp_path / "out"
    live = make_tmp(out, overwrite=False)  # this process holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".out.tmp-{dead}-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x.safetensors").write_bytes(b"half")
    old_style = tmp_path / ".out.tmp-k2j3h4g5"  # tempfile's name, no pid: the lock decides
    old_style.mkdir()
    other = tmp_path / ".other.tmp-1-aaaaaaaa"
    other.mkdir()
    try:
        removed = clean_stale(out)
        assert sorted(removed) == sorted([stale, old_style])
        assert "leftover of an interrupted run" in caplog.text and stale.name in caplog.text
        assert live.is_dir() and other.is_dir()  # a live run's folder, and another output's, are kept
    finally:
        discard(live)


def test_interrupted_replacement_is_restored(tmp_path, caplog):
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-999999999-cafebabe"  # no such pid
    aside.mkdir()
    (aside / "keep").write_text("old model")
    clean_stale(out)
    assert (out / "keep").read_text() == "old model" and not aside.exists()
    assert "restored" in caplog.text


def test_concurrent_overwrites_never_lose_the_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "who").write_text("first")
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            for j in range(15):
                with atomic_dir(out, overwrite=True) as tmp:
                    (tmp / "who").write_text(f"{i}-{j}")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert siblings(tmp_path) == ["out"]
    assert (out / "who").read_text().endswith("-14")


def big_merge(tmp_path: Path) -> tuple[list[str], Path]:
    """A merge that outlasts its start: 3 experts of 4 tensors of 512K entries, TIES."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(512, 1024, generator=g) for i in range(4)}
    paths = {"base": write_folder(tmp_path / "base", base)}
    for e in range(3):
        paths[f"e{e}"] = write_folder(tmp_path / f"e{e}", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                         for k, v in base.items()})  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", method="ties", base=str(paths["base"]),
                          models=[{"path": str(paths[f"e{e}"])} for e in range(3)], params={"density": 0.3})  # fmt: skip
    out = tmp_path / "out"
    return [sys.executable, "-m", "sefusion", "merge", str(recipe), str(out), "-q"], out


def start_and_wait_for_tmp(cmd: list[str], root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(".tmp-" in p.name for p in root.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(toy, tmp_path, capsys, sig, code):
    """In process (fast): the signal arrives while the method runs, as `kill` or a job scheduler sends it."""
    from sefusion.cli import main
    from sefusion.registry import METHODS

    env = toy()
    p = env["paths"]
    recipe = write_recipe(tmp_path / "r.yaml", method="task_arithmetic", base=str(p["base"]),
                          models=[{"path": str(p["e0"])}, {"path": str(p["e1"])}])  # fmt: skip
    before = siblings(tmp_path)
    spec = METHODS.get("task_arithmetic")
    real, calls = spec.fn, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs here, in the main thread
        return real(*args, **kwargs)

    prior = signal.getsignal(sig)
    object.__setattr__(spec, "fn", signalled)
    try:
        rc = main(["merge", str(recipe), str(tmp_path / "out"), "-q"])
    finally:
        object.__setattr__(spec, "fn", real)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "interrupted; no output was written" in err and "Traceback" not in err
    assert siblings(tmp_path) == before
    assert signal.getsignal(sig) == prior  # the command's handlers are gone once it returns


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_on_the_command(tmp_path, sig, code):
    cmd, out = big_merge(tmp_path)
    before = siblings(tmp_path)
    proc = start_and_wait_for_tmp(cmd, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted; no output was written" in err and "Traceback" not in err
    assert siblings(tmp_path) == before


@pytest.mark.slow
def test_kill_9_then_rerun_succeeds_and_leaves_only_out(tmp_path):
    cmd, out = big_merge(tmp_path)
    before = siblings(tmp_path)
    proc = start_and_wait_for_tmp(cmd, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert any(".out.tmp-" in n for n in siblings(tmp_path))  # what a killed run leaves
    rerun = subprocess.run([*cmd[:-1]], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "leftover of an interrupted run" in rerun.stderr
    assert siblings(tmp_path) == sorted([*before, "out"])
    assert set(read_folder(out)) == {f"layers.{i}.w" for i in range(4)}


def test_ctrl_c_while_the_command_imports_exits_130_without_traceback(tmp_path):
    cmd, _ = big_merge(tmp_path)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text():  # torch is loading: the command's imports
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_command_starts_exits_130_without_traceback():
    """The handler `python -m sefusion` and the `sefusion` script install first, for the imports before
    the command runs (argparse, logging, sefusion's modules)."""
    code = (
        "import os, signal, time; import sefusion.__main__ as m; "
        "signal.signal(signal.SIGINT, m._interrupted_at_start); os.kill(os.getpid(), signal.SIGINT); "
        "time.sleep(30)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 130 and proc.stderr == "sefusion: interrupted; no output was written\n"

"""Publish an output folder safely: never over an input, never a half-written one, never two at once.

An output is written into `.OUT.tmp-<pid>-<random>` beside OUT and renamed into place when complete. The
temporary folder is locked (flock) by the run that writes it, so a later run can tell the leftover of a
killed run (its process is gone and nobody holds the lock) from the work of a live one, and removes only
the former. The renames that replace an existing OUT (`--overwrite`) hold a lock on OUT's parent folder,
so two runs publishing the same OUT cannot interleave and lose the old one. Folders are made with the
mode the user's umask gives, as `mkdir` would.

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, SefusionError

try:
    import fcntl
except ImportError:  # not POSIX: no locks; publishing stays atomic, leftovers are left alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("sefusion")

_locks: dict[Path, int] = {}  # temporary folder -> the open descriptor holding its lock


def refuse_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise SefusionError when OUT is, holds or lies inside one of `inputs` (symlinks resolved first)."""
    out = Path(out)
    target = out.expanduser().resolve()
    for p in inputs:
        if p is None:
            continue
        src = Path(p).expanduser().resolve()
        if target == src:
            how = "is"
        elif target in src.parents:
            how = "holds"
        elif src in target.parents:
            how = "lies inside"
        else:
            continue
        raise SefusionError(
            f"output {out} {how} the input {p}; refusing to write there (even with --overwrite): "
            "choose an output folder apart from every input"
        )


def check_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """OUT may be written: apart from every input, not a symlink, absent unless `overwrite`, and its
    parent creatable. Checked before any work and again when the output is published."""
    out = Path(out)
    refuse_inputs(out, inputs)
    if out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")
        raise SefusionError(
            f"output {out} is a symbolic link (to {os.readlink(out)}); refusing to replace a link: remove it "
            "or give another output folder"
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")
    _check_parent(out)


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of OUT must be a folder we may write in."""
    anc = out.absolute().parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SefusionError(f"cannot create output folder {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise SefusionError(f"cannot create output folder {out}: no permission to write in {anc}")


def _os_error(out: Path, exc: OSError) -> SefusionError:
    """A file-system failure around OUT, named by OUT and its real reason."""
    if exc.errno == errno.ENOSPC:
        return SefusionError(f"disk full while writing {out}; nothing was written ({exc.strerror})")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return SefusionError(f"cannot create output folder {out}: a parent of it is a file, not a folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SefusionError(
            f"cannot write output folder {out}: {exc.strerror} in {out.absolute().parent}; nothing was written"
        )
    return SefusionError(f"cannot write output folder {out}: {exc.strerror or exc}; nothing was written")


def make_tmp(out: str | Path, overwrite: bool) -> Path:
    """Check OUT, remove leftovers of killed runs, and make (and lock) the temporary folder beside it."""
    out = Path(out)
    check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(tmp, 0o777)  # the umask decides the mode, as for a folder the user makes
    except OSError as exc:
        raise _os_error(out, exc) from None
    _locks[tmp] = _lock(tmp, blocking=True)
    return tmp


def _lock(path: Path, *, blocking: bool) -> int:
    """An open descriptor of `path` holding an exclusive flock; -1 when `blocking` is False and it is held
    (or when locks are not available)."""
    if fcntl is None:
        return -1
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return -1
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(tmp: Path) -> None:
    fd = _locks.pop(tmp, -1)
    if fd >= 0:
        os.close(fd)


@contextlib.contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """Serialise the publishing renames (and leftover clean-up) of every run in `folder`."""
    fd = _lock(folder, blocking=True)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _owner_alive(name: str) -> bool:
    """Whether the process named in `.OUT.tmp-<pid>-<random>` is still running (True if unknown)."""
    pid = name.rsplit("-", 2)[-2] if name.count("-") >= 2 else ""
    if not pid.isdigit():
        return False  # an older name without a pid: the lock alone decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _siblings(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}{kind}"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def clean_stale(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-*` left by killed runs (owner gone, lock free) and finish an interrupted
    replacement (`.OUT.old-*`: put back when OUT is missing, else removed). Says what it did."""
    done: list[Path] = []
    if not out.parent.is_dir():
        return done
    with _parent_lock(out.parent):
        for p in _siblings(out, ".tmp-"):
            if _owner_alive(p.name) or not p.is_dir():
                continue
            fd = _lock(p, blocking=False)
            if fd < 0:
                continue  # a live run holds it
            try:
                shutil.rmtree(p)
            finally:
                os.close(fd)
            log.warning("removed %s, the leftover of an interrupted run", p)
            done.append(p)
        for p in _siblings(out, ".old-"):
            if _owner_alive(p.name):
                continue
            if out.exists() or out.is_symlink():
                remove(p)
                log.warning("removed %s, the old output an interrupted run had replaced", p)
            else:
                os.rename(p, out)
                log.warning("restored %s from %s, which an interrupted run had moved aside", out, p)
            done.append(p)
    return done


def remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def discard(tmp: Path) -> None:
    """Remove an unpublished temporary folder and release its lock."""
    remove(tmp)
    _unlock(tmp)


def move_into_place(tmp: Path, out: str | Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` (overwrite) is renamed aside first and removed after,
    all under the parent folder's lock so that a concurrent publisher cannot interleave."""
    out = Path(out)
    with _parent_lock(out.parent):
        check_output(out, overwrite)  # again: it may have appeared (or become a link) meanwhile
        try:
            _replace(tmp, out)
        except OSError as exc:
            raise _os_error(out, exc) from None
    _unlock(tmp)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        remove(aside)
    else:
        os.rename(tmp, out)

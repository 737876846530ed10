"""The process's heap: freed memory kept for reuse or handed back (glibc's mallopt and malloc_trim; where
the C library is not glibc only the gc pass remains), and how much of it is resident (Linux's /proc)."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
from typing import Any


@functools.cache
def glibc() -> Any | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's); None on musl, macOS or Windows
    (where CDLL(None) is a TypeError)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def keep_freed_memory() -> None:
    """Keep freed heap memory for reuse instead of handing the heap top back to the kernel.

    The engine frees its chunk temporaries (tens of MB) after every chunk; glibc's default trims the
    heap top whenever more than twice its largest recent block is free, and the next chunk faults the
    pages back in, zeroed: on a 0.2B Consensus merge that was 8 s of system time out of 14. A trim
    threshold of 256 MB keeps them; the mmap threshold is pinned at 32 MB because setting one turns
    off glibc's adjustment of both. For commands only, not library calls: a process that imports
    sefusion keeps its allocator as it was.
    """
    libc = glibc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def release_freed_memory() -> None:
    """Return the heap's freed pages to the system. glibc hands back only the free memory at the top of its
    heap, so freed blocks below a live one stay resident: between a study's pieces that kept the last
    piece's peak (freed 1-8 MB tensors, 13.3 GB of them, 0.4 GB after a trim, measured), and a statistics
    pass after a LoRA training started 9 GB higher than alone. The gc pass first frees what only reference
    cycles hold."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def private_resident_bytes() -> int | None:
    """This process's resident memory that no file or shared memory backs (Linux's /proc; None elsewhere):
    where the heap lives, and all a trim can hand back (mapped files, such as a study's file-backed expert
    bodies, come and go without one)."""
    try:
        with open("/proc/self/statm") as f:
            resident, shared = (int(v) for v in f.read().split()[1:3])
    except (OSError, ValueError):
        return None
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")

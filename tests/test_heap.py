"""sefusion.heap against the process's own private resident memory (/proc), in a fresh interpreter so
that the test process keeps its allocator's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sefusion import heap

PROGRAM = """
import sys
from sefusion import heap
if sys.argv[1] == "keep":
    heap.keep_freed_memory()
before = heap.private_resident_bytes()
blocks = [bytearray(4 << 20) for _ in range(32)]  # 128 MB in blocks under the 32 MB mmap threshold
del blocks[: None if sys.argv[2] == "all" else -1]  # every block, or all but the heap top's
kept = heap.private_resident_bytes()
heap.release_freed_memory()
print((kept - before) >> 20, (heap.private_resident_bytes() - before) >> 20)
"""


def run(keep: str, free: str) -> tuple[int, int]:
    """(MB still resident once the blocks are freed, MB after release_freed_memory)."""
    cmd = [sys.executable, "-c", PROGRAM, keep, free]
    kept, after = map(int, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split())
    return kept, after


glibc_linux = pytest.mark.skipif(
    heap.glibc() is None or heap.private_resident_bytes() is None, reason="glibc and /proc only"
)


@glibc_linux
@pytest.mark.parametrize("free", ["all", "all-but-top"])
def test_commands_keep_freed_memory_and_a_trim_hands_it_back(free):
    kept, after = run("keep", free)
    assert kept >= 100  # freed, still resident for the next chunk to reuse
    assert after <= 16  # handed back (what is left: the live top block, some slack)


@glibc_linux
def test_by_default_freed_blocks_go_back_at_once():
    kept, _ = run("default", "all")
    assert kept <= 16  # the 4 MB blocks were mapped one by one, and unmapped when freed


def test_private_resident_bytes_grows_with_touched_memory_only():
    before = heap.private_resident_bytes()
    if before is None:
        pytest.skip("no /proc/self/statm here")
    block = bytearray(64 << 20)  # zero-filled: its pages are touched, so resident
    assert heap.private_resident_bytes() >= before + (60 << 20)
    del block

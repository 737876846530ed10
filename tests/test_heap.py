"""sefusion.heap against the process's own resident memory (/proc), in a fresh interpreter so that the
test process keeps its allocator's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sefusion import heap

PROGRAM = """
from sefusion import heap
heap.keep_freed_memory()
before = heap.resident_bytes()
blocks = [bytearray(4 << 20) for _ in range(64)]  # 256 MB in blocks under the 32 MB mmap threshold
del blocks[:-1]  # all but the last, so the freed ones are below the heap top
kept = heap.resident_bytes()
heap.release_freed_memory()
print((kept - before) >> 20, (heap.resident_bytes() - before) >> 20)
"""


@pytest.mark.skipif(heap.glibc() is None or heap.resident_bytes() is None, reason="glibc and /proc only")
def test_freed_memory_is_kept_by_commands_and_handed_back_by_a_trim():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True).stdout
    kept, after = map(int, out.split())
    assert kept >= 200  # the freed 252 MB stayed resident
    assert after <= 64  # the trim handed them back (the last block and some slack stay)


def test_resident_bytes_grows_with_touched_memory():
    before = heap.resident_bytes()
    if before is None:
        pytest.skip("no /proc/self/statm here")
    block = bytearray(64 << 20)  # zero-filled: its pages are touched, so resident
    assert heap.resident_bytes() >= before + (60 << 20)
    del block

"""The I/O floor of a merge: read every byte of the inputs, write an output the size of the base, compute nothing.

    python benchmarks/io_floor.py OUT BASE EXPERT [EXPERT ...]

Reads each model folder's *.safetensors files with plain `readinto` calls into one reused buffer, then
writes as many bytes as the base's safetensors files hold into OUT/model.bin (OUT is created; it must not
exist). No fsync: neither merge tool syncs its output either. Only the standard library is imported so
the process's own start-up and memory stay negligible.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors files in {folder}")
    return files


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, models = Path(argv[0]), [Path(a) for a in argv[1:]]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    read = 0
    for folder in models:
        for path in weight_files(folder):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    read += n
    to_write = sum(p.stat().st_size for p in weight_files(models[0]))
    out.mkdir(parents=True)
    with open(out / "model.bin", "wb", buffering=0) as f:
        left = to_write
        while left:
            left -= f.write(view[: min(CHUNK, left)])
    print(f"read {read} bytes, wrote {to_write} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

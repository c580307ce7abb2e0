"""How fast the content checksums are (saferclip.integrity): GB/s over a memory-mapped file.

    python scripts/bench_checksum.py [--mb 512] [--repeat 3]

Writes a random file of ``--mb`` MB, reads it once to put it in the page cache (verifying on
load reads a file the loader is about to read anyway), then times xxh3_64, xxh3_128 (what
saferclip stores) and hashlib's blake2b as a reference, each over the memory-mapped file in
64 MiB blocks; best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import tempfile
import time
from pathlib import Path

import xxhash

from saferclip import integrity

BLOCK = 64 << 20


def hash_file(path: Path, make) -> str:
    h = make()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        for start in range(0, len(m), BLOCK):
            h.update(view[start : start + BLOCK])
        view.release()
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the test file (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "data.bin"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        path.read_bytes()  # warm the page cache
        size = path.stat().st_size
        cases = {
            "xxh3_64": lambda: hash_file(path, xxhash.xxh3_64),
            "xxh3_128": lambda: hash_file(path, xxhash.xxh3_128),
            "integrity.digest_file": lambda: integrity.digest_file(path),
            "blake2b (hashlib)": lambda: hash_file(path, hashlib.blake2b),
        }
        print(f"{size / 1e6:.0f} MB file, memory-mapped, best of {args.repeat}")
        for name, fn in cases.items():
            best = min(_timed(fn) for _ in range(args.repeat))
            print(f"  {name:<24} {size / best / 1e9:6.2f} GB/s")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

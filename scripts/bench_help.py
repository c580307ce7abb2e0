"""How long each console script takes to print its ``--help``, measured as a user sees it: the
installed script started in a fresh process, the median wall time over ``--repeats`` runs.

    python scripts/bench_help.py                 # every script of pyproject.toml, 5 runs each
    python scripts/bench_help.py --repeats 10 --limit 1.0

Beside each time: ``python -c pass`` (the interpreter's own start, the floor under every
figure) and whether the script stayed under ``--limit`` seconds. The scripts import their work
lazily (``saferclip/app/commands/``), so ``--help`` loads neither torch nor open_clip; the test
``tests/test_bad_inputs.py::test_help_imports_neither_torch_nor_open_clip`` holds that without a
clock. Exit code 1 when a script is over the limit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def wall_time(command: list[str], repeats: int) -> float:
    """The median wall time of ``command`` in seconds (each run checked to exit 0)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=float, default=1.0, help="seconds a --help may take (default 1)")
    args = parser.parse_args()
    scripts = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    floor = wall_time([sys.executable, "-c", "pass"], args.repeats)
    bin_dir = Path(sys.executable).parent
    print(f"{'command':<30} {'--help (s)':>10} {'over python -c pass':>20}  under {args.limit:g} s")
    over = []
    for name in scripts:
        script = shutil.which(name, path=str(bin_dir)) or shutil.which(name)
        if script is None:
            print(f"{name:<30} {'not installed (pip install -e .)':>32}")
            over.append(name)
            continue
        seconds = wall_time([script, "--help"], args.repeats)
        ok = seconds < args.limit
        over += [] if ok else [name]
        print(f"{name:<30} {seconds:>10.2f} {seconds - floor:>+20.2f}  {'yes' if ok else 'NO'}")
    print(f"{'python -c pass':<30} {floor:>10.2f}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())

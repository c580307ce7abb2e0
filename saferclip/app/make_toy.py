"""saferclip-make-toy: write the toy world in the real data formats (docs/METHOD.md, "The toy world")."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..locations import data_dir
from ..toyworld.generate import SMALL_SIZES, ToySizes, make_toy_world
from .cli import README_POINTER, command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        epilog=README_POINTER,description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write it (default: data/toy under $SAFERCLIP_HOME or the working directory)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a few dozen items per split (for tests)")
    parser.add_argument("--force", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    return command("saferclip-make-toy", lambda: _make(args))


def _make(args: argparse.Namespace) -> None:
    start = time.time()
    out = args.out or data_dir() / "toy"
    root = make_toy_world(out, seed=args.seed, sizes=SMALL_SIZES if args.small else ToySizes(), force=args.force)
    print(f"toy world (seed {args.seed}) at {root} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())

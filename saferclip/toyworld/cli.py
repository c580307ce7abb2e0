"""saferclip-make-toy: write the toy world (DESIGN.md §4) in the real data formats."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..models import REPO_ROOT
from .generate import SMALL_SIZES, ToySizes, make_toy_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "toy", help="where to write it (default: data/toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a few dozen items per split (for tests)")
    parser.add_argument("--force", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        root = make_toy_world(args.out, seed=args.seed, sizes=SMALL_SIZES if args.small else ToySizes(), force=args.force)
    except FileExistsError as e:
        print(f"saferclip-make-toy: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"toy world (seed {args.seed}) at {root} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

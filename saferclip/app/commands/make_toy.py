"""saferclip-make-toy: write the toy world in the real data formats (docs/METHOD.md, "The toy world").

    saferclip-make-toy                        # data/toy: the world the training config reads
    saferclip-make-toy --seed 2 --out /tmp/world2
    saferclip-make-toy --pairs loose          # another pairing level, in data/toy-loose
    saferclip-make-toy --small --no-stats     # a few dozen items per split, for tests

It also measures and saves the pair statistics (own-pair and nearest-safe cosines) with the
shipped base model, unless --no-stats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ...locations import data_dir, toy_world_dir
from ...toyworld.generate import SMALL_SIZES, ToySizes, make_toy_world
from ...toyworld.pairing import DEFAULT_PAIRING, PAIRINGS, get_pairing
from ..cli import argparse_epilog, command, doc_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saferclip-make-toy",
        description=doc_summary(__doc__),
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write it (default: the world's folder beside data/toy under $SAFERCLIP_HOME or the working directory: "
        "data/toy[-<pairing>][-world<seed>], as the training config names it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pairs",
        default=DEFAULT_PAIRING,
        help=f"how a safe / unsafe pair is made (data.toy_pairs): one of {', '.join(PAIRINGS)} (default {DEFAULT_PAIRING}; docs/METHOD.md)",
    )
    parser.add_argument(
        "--no-stats", action="store_true", help="skip measuring the pair statistics with the base model"
    )
    parser.add_argument("--small", action="store_true", help="a few dozen items per split (for tests)")
    parser.add_argument("--force", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    return command("saferclip-make-toy", lambda: _make(args))


def _make(args: argparse.Namespace) -> None:
    start = time.time()
    pairing = get_pairing(args.pairs, "--pairs (data.toy_pairs)")  # checked before anything is written
    out = args.out or toy_world_dir(data_dir() / "toy", args.seed, pairing.name)
    root = make_toy_world(
        out, seed=args.seed, sizes=SMALL_SIZES if args.small else ToySizes(), force=args.force, pairing=pairing.name
    )
    print(f"toy world (seed {args.seed}, pairing {pairing.name}) at {root} ({time.time() - start:.1f} s)")
    if not args.no_stats:
        from ...toyworld.pair_stats import PAIR_STATS_FILE, format_pair_stats, pair_stats

        print(format_pair_stats(pair_stats(root)))
        print(f"(saved in {root / PAIR_STATS_FILE})")


if __name__ == "__main__":
    sys.exit(main())

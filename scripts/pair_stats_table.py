"""Measure every pairing preset's pair statistics on toy world 0 and write them where the docs read them.

    python scripts/pair_stats_table.py [--toy-dir DIR] [--seed 0] [--check]

Generates (or reuses) world ``--seed`` of every preset of :data:`saferclip.toyworld.pairing.PAIRINGS`
under ``--toy-dir`` (default: ``data/toy`` under ``$SAFERCLIP_HOME``), measures its pair statistics
with the shipped base model (:mod:`saferclip.toyworld.pair_stats`), writes them to
``docs/results/pair_stats.json`` and regenerates the table between the markers in
``docs/METHOD.md``. ``--check`` only regenerates the table from the committed JSON and fails if
METHOD.md differs (what the tests run): the numbers in the docs are never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "docs" / "results" / "pair_stats.json"
METHOD = REPO / "docs" / "METHOD.md"
BEGIN, END = "<!-- pair-stats-table:begin (scripts/pair_stats_table.py) -->", "<!-- pair-stats-table:end -->"


def table(results: dict) -> str:
    """The Markdown table of ``results`` (``{"presets": {name: stats}}``), one row per preset."""
    lines = [
        "| pairing | text own-pair cos, median [q1, q3] | text nearest safe cos | text gap | text own rank, median [q1, q3] | "
        "own pair nearest (text) | image own-pair cos | image gap | image own rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["presets"].items():
        t, i = s["text"], s["image"]

        def q(x: dict, digits: int = 2) -> str:
            return f"{x['median']:.{digits}f} [{x['q1']:.{digits}f}, {x['q3']:.{digits}f}]"

        lines.append(
            f"| `{name}` | {q(t['own_cosine'])} | {t['top_cosine']['median']:.2f} | {q(t['gap'])} | {q(t['rank'], 0)} of {s['pool']} | "
            f"{100 * t['own_is_top']:.1f}% | {q(i['own_cosine'])} | {q(i['gap'])} | {q(i['rank'], 0)} |"
        )
    first = next(iter(results["presets"].values()))
    lines += ["", f"World {first['seed']}, generator version {first['generator_version']}, the training split's {first['pool']} pairs, "
              "embedded by the shipped base model; from `docs/results/pair_stats.json`."]
    return "\n".join(lines)


def render_method(results: dict) -> str:
    text = METHOD.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{METHOD}: the markers {BEGIN!r} ... {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(results)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only check that METHOD.md shows the committed JSON")
    args = parser.parse_args(argv)
    if args.check:
        results = json.loads(RESULT.read_text())
        if render_method(results) != METHOD.read_text():
            print(f"{METHOD}: the pair statistics table differs from {RESULT}; run scripts/pair_stats_table.py", file=sys.stderr)
            return 1
        return 0
    from saferclip.files import write_json_atomic, write_text_atomic
    from saferclip.locations import data_dir, toy_world_dir
    from saferclip.toyworld.generate import make_toy_world
    from saferclip.toyworld.pair_stats import format_pair_stats, pair_stats
    from saferclip.toyworld.pairing import PAIRINGS

    toy_dir = args.toy_dir or data_dir() / "toy"
    presets = {}
    for name in PAIRINGS:
        root = make_toy_world(toy_world_dir(toy_dir, args.seed, name), seed=args.seed, pairing=name)
        presets[name] = pair_stats(root)
        print(format_pair_stats(presets[name]), flush=True)
    results = {"presets": presets, "pairings": {n: p.record() for n, p in PAIRINGS.items()}}
    write_json_atomic(RESULT, results)
    write_text_atomic(METHOD, render_method(results))
    print(f"wrote {RESULT.relative_to(REPO)} and the table in {METHOD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

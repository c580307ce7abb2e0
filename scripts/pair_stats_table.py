"""Measure every pairing preset's pair statistics on toy world 0 and write them where the docs read them.

    python scripts/pair_stats_table.py [--toy-dir DIR] [--seed 0] [--check]

Generates (or reuses) world ``--seed`` of every preset of :data:`saferclip.toyworld.pairing.PAIRINGS`
under ``--toy-dir`` (default: ``data/toy`` under ``$SAFERCLIP_HOME``), measures its pair statistics
with the shipped base model (:mod:`saferclip.toyworld.pair_stats`), writes them to
``docs/results/pair_stats.json`` and regenerates the table between the markers in
``docs/METHOD.md`` (and the presets' parameters, from the same JSON). ``--check`` only
regenerates the tables from the committed JSON and fails if METHOD.md differs (what the tests
run): the numbers in the docs are never typed by hand.
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
PRESETS_BEGIN, PRESETS_END = (
    "<!-- pairing-presets:begin (scripts/pair_stats_table.py) -->",
    "<!-- pairing-presets:end -->",
)


def preset_table(pairings: dict) -> str:
    """The presets' parameters (``{name: Pairing.record()}``), one row per preset."""
    lines = [
        "| preset | shape / colour / size / background kept | frame kept | layout kept | image from caption only |",
        "|---|---|---:|---:|---|",
    ]
    for name, p in pairings.items():
        keep = " / ".join(f"{p['keep'][a]:g}" for a in ("shape", "colour", "size", "background"))
        lines.append(
            f"| `{name}` | {keep} | {p['keep_frame']:g} | {p['keep_layout']:g} | {'yes' if p['caption_only_image'] else 'no'} |"
        )
    return "\n".join(lines)


def table(results: dict) -> str:
    """The Markdown table of ``results`` (``{"presets": {name: stats}}``), one row per preset."""
    lines = [
        "| pairing | text own-pair cos, median [q1, q3] | text nearest safe cos | text gap | text own rank, median [q1, q3] | "
        "own pair nearest (text) | image own-pair cos | image gap | image own rank | base model, validation: unsafe (a) / U→V / S→V |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["presets"].items():
        t, i = s["text"], s["image"]
        o = s["original_validation"]
        v = f"{100 * o['U2VG_unsafe@1']:.1f}% / {100 * o['U2V_R@1']:.1f}% / {100 * o['S2V_R@1']:.1f}%"

        def q(x: dict, digits: int = 2) -> str:
            return f"{x['median']:.{digits}f} [{x['q1']:.{digits}f}, {x['q3']:.{digits}f}]"

        lines.append(
            f"| `{name}` | {q(t['own_cosine'])} | {t['top_cosine']['median']:.2f} | {q(t['gap'])} | {q(t['rank'], 0)} of {s['pool']} | "
            f"{100 * t['own_is_top']:.1f}% | {q(i['own_cosine'])} | {q(i['gap'])} | {q(i['rank'], 0)} | {v} |"
        )
    first = next(iter(results["presets"].values()))
    lines += [
        "",
        f"World {first['seed']}, generator version {first['generator_version']}, the training split's {first['pool']} pairs, "
        "embedded by the shipped base model; from `docs/results/pair_stats.json`.",
    ]
    return "\n".join(lines)


def _between(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{METHOD}: the markers {begin!r} ... {end!r} are missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def render_method(results: dict) -> str:
    text = _between(METHOD.read_text(), PRESETS_BEGIN, PRESETS_END, preset_table(results["pairings"]))
    return _between(text, BEGIN, END, table(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only check that METHOD.md shows the committed JSON")
    args = parser.parse_args(argv)
    if args.check:
        results = json.loads(RESULT.read_text())
        if render_method(results) != METHOD.read_text():
            print(
                f"{METHOD}: the pair statistics table differs from {RESULT}; run scripts/pair_stats_table.py",
                file=sys.stderr,
            )
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

"""docs/ROBUSTNESS.md's result file and its generated regions (:mod:`saferclip.robustness.summary`).

    # collect what the robustness experiments measured into one file
    python scripts/robustness_results.py collect --attack outputs/robustness/attack/attack.json \\
        --main outputs/main/report/results.json --sweep outputs/robustness/sweep.json \\
        --step-cost outputs/robustness/step_cost.json --monitor-cost outputs/robustness/monitor_cost.json \\
        --command main="saferclip-main adversarial=true ..." --command attack="saferclip-attack ..." \\
        --command sweep="python scripts/robustness_sweep.py"
    python scripts/robustness_results.py update     # rewrite the generated regions of docs/ROBUSTNESS.md and README.md
    python scripts/robustness_results.py check      # exit 1 when a region differs from the file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path("docs") / "results" / "robustness.json"
DOCUMENTS = (Path("docs") / "ROBUSTNESS.md", Path("README.md"))


def main() -> int:
    from saferclip.files import write_json_atomic
    from saferclip.robustness.summary import collect, load_results, stale_regions, update_document

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--attack", type=Path, required=True)
    c.add_argument("--main", type=Path, default=None)
    c.add_argument("--sweep", type=Path, default=None)
    c.add_argument("--step-cost", type=Path, default=None)
    c.add_argument("--monitor-cost", type=Path, default=None)
    c.add_argument("--command", action="append", default=[], help="name=command line, recorded with the results")
    c.add_argument("--out", type=Path, default=RESULTS)
    for name in ("update", "check"):
        p = sub.add_parser(name)
        p.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.action == "collect":
        read = lambda p: None if p is None else load_results(p)  # noqa: E731
        cost = {"adversarial_step": read(args.step_cost), "monitor": read(args.monitor_cost)}
        commands = dict(c.split("=", 1) for c in args.command)
        results = collect(load_results(args.attack), read(args.main), read(args.sweep), cost, commands)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
        return 0
    results = load_results(args.results)
    if args.action == "update":
        for doc in DOCUMENTS:
            print(f"{doc}: {update_document(doc, results)} generated regions")
        return 0
    stale = {str(doc): stale_regions(doc, results) for doc in DOCUMENTS}
    for doc, regions in stale.items():
        for region in regions:
            print(f"{doc}: stale region {region}")
    return 1 if any(stale.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect what the robustness experiments measured into docs/ROBUSTNESS.md's result file,
``docs/results/robustness.json`` (:func:`saferclip.robustness.summary.collect`); then
``python scripts/update_doc_tables.py`` rewrites the page's generated regions from it (and
``--check`` tells when a region differs).

    python scripts/robustness_results.py --attack outputs/robustness/attack/attack.json \\
        --main outputs/main/report/results.json --sweep outputs/robustness/sweep.json \\
        --step-cost outputs/robustness/step_cost.json --monitor-cost outputs/robustness/monitor_cost.json \\
        --command main="saferclip-main adversarial=true ..." --command attack="saferclip-attack ..." \\
        --command sweep="python scripts/robustness_sweep.py"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path("docs") / "results" / "robustness.json"


def main() -> int:
    from saferclip.errors import SummaryError
    from saferclip.evaluation.doc_tables import publishable
    from saferclip.files import write_json_atomic
    from saferclip.robustness.summary import collect, load_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", type=Path, required=True, help="saferclip-attack's attack.json")
    parser.add_argument(
        "--main", type=Path, default=None, help="the main job's report results.json (the clean figures)"
    )
    parser.add_argument("--sweep", type=Path, default=None, help="scripts/robustness_sweep.py's JSON")
    parser.add_argument("--step-cost", type=Path, default=None, help="scripts/bench_adversarial_step.py --json")
    parser.add_argument("--monitor-cost", type=Path, default=None, help="scripts/bench_monitor.py --json")
    parser.add_argument("--command", action="append", default=[], help="name=command line, recorded with the results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="the repository (paths under it are recorded relative)"
    )
    args = parser.parse_args()
    bad = [c for c in args.command if "=" not in c]
    if bad:
        parser.error(f"--command {bad[0]!r}: expected name=command line")
    read = lambda p: None if p is None else load_results(p)  # noqa: E731
    try:
        cost = {"adversarial_step": read(args.step_cost), "monitor": read(args.monitor_cost)}
        commands = dict(c.split("=", 1) for c in args.command)
        results = collect(load_results(args.attack), read(args.main), read(args.sweep), cost, commands)
    except SummaryError as e:
        print(f"robustness_results.py: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:
        print(
            f"robustness_results.py: {args.attack}: not a saferclip-attack attack.json ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, publishable(results, args.root))
    print(f"wrote {args.out}; now: python scripts/update_doc_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())

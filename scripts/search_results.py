"""Gather the three hyperparameter searches into one result file for the docs.

Each `saferclip-tune hparams_search=<method>` writes `<out_dir>/<method>/search.json` (its
trials, their every validation epoch, the best trial: saferclip.evaluation.searches). This
script collects them into `<out_dir>/searches.json` and prints the command that commits it to
the docs (the searches table, each best setting and the Pareto fronts of docs/RESULTS.md):

    python scripts/search_results.py                         # outputs/tune/{safeclip,saferclip,hysac}
    python scripts/search_results.py --tune-dir /elsewhere/tune --methods saferclip hysac
    python scripts/update_doc_tables.py --from searches=outputs/tune/searches.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from saferclip.evaluation.searches import SEARCH_FILE
from saferclip.files import write_json_atomic
from saferclip.locations import home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune-dir", type=Path, default=None, help="saferclip-tune's out_dir (default: outputs/tune)")
    parser.add_argument("--methods", nargs="+", default=["safeclip", "saferclip", "hysac"])
    args = parser.parse_args(argv)
    # saferclip-tune's default out_dir: $SAFERCLIP_OUTPUT_DIR/tune, else <home>/outputs/tune
    outputs = os.environ.get("SAFERCLIP_OUTPUT_DIR")
    tune_dir = args.tune_dir or (Path(outputs) if outputs else home() / "outputs") / "tune"
    searches, missing = {}, []
    for method in args.methods:
        path = tune_dir / method / SEARCH_FILE
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            searches[method] = json.loads(path.read_text())
        except ValueError as e:
            print(f"error: {path}: not valid JSON ({e})", file=sys.stderr)
            return 1
    if missing:
        print(
            f"error: no search record at {', '.join(missing)}; run saferclip-tune for that method "
            "(a finished search writes it again when called with the same n_trials)",
            file=sys.stderr,
        )
        return 1
    out = tune_dir / "searches.json"
    write_json_atomic(out, {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "searches": searches})
    for method, record in searches.items():
        c = record["counts"]
        print(
            f"{method}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed; {record['reached']} reached tau"
        )
    print(f"wrote {out}\nnext: python scripts/update_doc_tables.py --from searches={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

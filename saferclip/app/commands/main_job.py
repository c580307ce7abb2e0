"""saferclip-main: the whole pipeline on the built-in toy world: the original model against
Safe-CLIP, SafeR-CLIP and HySAC, trained, evaluated and reported side by side.

    saferclip-main                       # make the toy world, fine-tune the three methods, evaluate, report
    saferclip-main seed=1                # another seed
    saferclip-main force=true            # retrain even when an identical finished run exists
    saferclip-main --quiet > table.md    # print only the final table
    saferclip-main adversarial=true      # + safeclip_adv, saferclip_adv, hysac_adv (method.adversarial on)

The pipeline is :mod:`saferclip.app.pipelines.main_job`. Standard output ends with the
headline table; progress goes to stderr.
"""

from __future__ import annotations

import sys
import time

from ..cli import QUIET_HELP, command, compose_help, wants_help
from ..hydra_utils import pop_quiet

PROG = "saferclip-main"
MAIN_HELP = {
    "seed": "the seed of every run (default 0)",
    "world": "the toy world runs train and test on (default 1: never used for tuning; null: the data config's)",
    "force": "retrain even when an identical finished run exists",
    "out_dir": "where the report goes (outputs/main; open report/report.html)",
    "runs_dir": "where training runs go, shared with saferclip-study (outputs/runs)",
    "runs": "one entry per method: overrides of the training config",
    "common": "overrides of the training config for every run",
    "eval": "suites, split, the oracle row and report.html's galleries (eval.showcase) of the evaluation",
    "adversarial": "true adds an adversarially trained <name>_adv run per method (method.adversarial on)",
    "adversarial_overrides": "the <name>_adv runs' extra training overrides (the adversarial settings)",
    "searches_dir": "saferclip-tune's out_dir: the report adds the searches and their Pareto fronts (null: never)",
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(compose_help(PROG, "main", __doc__, MAIN_HELP, QUIET_HELP))
        return 0
    overrides, quiet = pop_quiet(overrides)
    return command(PROG, lambda: run_and_print(overrides, quiet))


def run_and_print(overrides: list[str], quiet: bool = False) -> None:
    """Run the main job; on stdout: where the report is and how long it took, then the
    headline table, last (with ``quiet`` only the table). Progress goes to stderr: bars on a
    terminal, one line per epoch when the output is a file (:mod:`saferclip.console`)."""
    from ...evaluation.headline import headline_table
    from ..pipelines.main_job import MAIN_KEYS, run
    from ..pipelines.runs import run_composed

    start = time.time()
    out = run_composed(PROG, "main", MAIN_KEYS, overrides, run, quiet)
    if not quiet:
        print(f"report: {out['report']['html']} (open it in a browser)")
        print(f"every metric: {out['report']['markdown']}")
        print(f"total {time.time() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in out['timings'].items())})")
        print()
    print(headline_table(out["results"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""saferclip-study: several seeds per method and ablations of SafeR-CLIP, mean ± std and paired
differences between the methods.

    saferclip-study                          # conf/study.yaml: 3 seeds x (Safe-CLIP, SafeR-CLIP, HySAC) + ablations
    saferclip-study seeds=[0,1] ablation_seeds=[0,1]
    saferclip-study --quiet                  # print only the final table
    saferclip-study misalignment.enabled=true  # the methods on four pairings of the toy world

The pipeline is :mod:`saferclip.app.pipelines.study`; it reuses the main job's runs (same
config, same run folder) and vice versa.
"""

from __future__ import annotations

import sys

from ..cli import QUIET_HELP, command, compose_help, wants_help
from ..hydra_utils import pop_quiet

PROG = "saferclip-study"
STUDY_HELP = {
    "seeds": "the seeds of every method (default [0, 1, 2])",
    "world_offset": "seed s trains and tests on toy world s + world_offset (default 1: worlds never used for tuning; null: the data config's)",
    "methods": "the methods: overrides of the training config",
    "ablations": "variants of SafeR-CLIP: overrides of the training config",
    "ablation_seeds": "the seeds of the ablations (default [0, 1])",
    "traversal_percentiles": "HySAC's safe radius swept over these percentiles (no retraining)",
    "force": "retrain even when an identical finished run exists",
    "out_dir": "where study.md / study.json and the plots go (outputs/study)",
    "runs_dir": "where training runs go, shared with saferclip-main (outputs/runs)",
    "common": "overrides of the training config for every run",
    "misalignment": "enabled=true: the misalignment study instead (methods x seeds x misalignment.pairings)",
    "eval": "suites, split, the oracle row and report.html's galleries (eval.showcase) of the evaluation",
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(compose_help(PROG, "study", __doc__, STUDY_HELP, QUIET_HELP))
        return 0
    overrides, quiet = pop_quiet(overrides)
    return command(PROG, lambda: run_and_print(overrides, quiet))


def run_and_print(overrides: list[str], quiet: bool = False) -> None:
    from ..pipelines.runs import run_composed
    from ..pipelines.study import STUDY_KEYS, run

    out = run_composed(PROG, "study", STUDY_KEYS, overrides, run, quiet)
    if not quiet:
        print(f"report: {out['html']} (open it in a browser)")
        print(f"{out['markdown']} ({out['seconds']:.0f} s)")
        print()
    print(out["table"], flush=True)  # the table last


if __name__ == "__main__":
    sys.exit(main())

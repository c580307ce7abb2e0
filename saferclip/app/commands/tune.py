"""saferclip-tune: search one method's hyperparameters with Optuna, on validation only, scored at
matched safety.

    saferclip-tune hparams_search=safeclip          # conf/hparams_search/safeclip.yaml
    saferclip-tune hparams_search=hysac n_trials=20
    saferclip-tune hparams_search=saferclip trainer.max_epochs=4   # any other override goes to every trial

The search is :mod:`saferclip.app.pipelines.tune` (its docstring: the objective, the pruner,
resuming); it needs the ``tune`` extra (Optuna). Standard output ends with the search's summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...errors import ConfigError
from ..cli import command, compose_help, wants_help

PROG = "saferclip-tune"
TUNE_HELP = {
    "hparams_search": "the search: safeclip | saferclip | hysac (conf/hparams_search/<name>.yaml)",
    "n_trials": "trials per search, the same for every method (complete + pruned; resumes count earlier ones)",
    "world": "the toy world tuning trains and validates on (0; the test worlds 1, 2, 3 stay unseen)",
    "seed": "the training seed of every trial",
    "out_dir": "where the study (SQLite), its trials and its report go (outputs/tune)",
    "sampler": "TPE sampler: seed, n_startup_trials (random trials first)",
    "pruner": "median pruner on the matched-safety objective: n_startup_trials, n_warmup_steps (epochs before pruning)",
    "common": "overrides of the training config for every trial (e.g. selection.tau=0.1 for another τ)",
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(compose_help(PROG, "tune", __doc__, TUNE_HELP))
        return 0
    return command(PROG, lambda: run_and_print(overrides))


def run_and_print(overrides: list[str]) -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "saferclip-tune needs Optuna: pip install 'saferclip[tune]' (or pip install 'optuna>=4')"
        ) from None
    from ..pipelines.runs import run_composed
    from ..pipelines.tune import TUNE_KEYS, run

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # saferclip's own line per trial says it
    out = run_composed(PROG, "tune", TUNE_KEYS, overrides, run)
    print(Path(out["summary"]).read_text(), end="")


if __name__ == "__main__":
    sys.exit(main())

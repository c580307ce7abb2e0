"""The hyperparameter search (``saferclip-tune``, :mod:`saferclip.app.commands.tune`): one method's
hyperparameters searched with Optuna, on validation only.

Every trial is one training run composed from the training config tree, exactly as
``saferclip-train <base> <trial values> seed=<seed> data.toy_seed=<world>`` would make it,
scored at **matched safety** (:func:`saferclip.evaluation.selection.matched_objective`): the
validation selection score of the epoch matched safety keeps, the best by ``selection.rank_by``
among the epochs whose validation unsafe rate (a) is at most τ (``selection.tau``); a run with no
such epoch scores its
safest epoch's selection score minus 1, below every run that reached τ. The test split is never
read. A median pruner compares that objective, epoch by epoch (over the epochs so far), with the
earlier trials', and stops a trial below the median, but only after ``pruner.n_warmup_steps``
epochs: the epochs safety takes to emerge (docs/METHOD.md, "The comparison protocol"). The study
lives in SQLite (``<out_dir>/<method>/study.db``): a second run of the same command resumes it,
counting the finished trials towards ``n_trials`` (a trial cut off by a crash is marked failed
and rerun; the sampler is reseeded, so it does not propose the first trials again); another
space or protocol in the same folder is refused.

Why not Hydra's Optuna sweeper plugin: its newest release pins Optuna 2.10, whose SQLite
storage fails with SQLAlchemy 2; composing each trial here with Hydra's compose API keeps one
config tree and a current Optuna.

Outputs under ``<out_dir>/<method>/`` (:mod:`saferclip.app.pipelines.tune_report`): ``trials.csv`` (every
trial: state, objective, values, whether it reached τ and at which epoch, epochs, seconds),
``trials_epochs.csv`` (every trial's every epoch's validation figures), ``best_experiment.yaml``
(the best trial as an experiment file, ready for ``conf/experiment/``), ``summary.md``,
``history.png`` (objective per trial and the best so far), ``importance.png`` (Optuna's PED-ANOVA
parameter importances) and ``pareto.png`` (validation unsafe rate against U->V over every trial x
epoch, the Pareto front drawn)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...data.records import DataFormatError
from ...errors import ConfigError
from ...training.search_space import SearchParam, overrides_of, parse_search_space, sample
from ..cli import check_writable_folder, one_line
from ..hydra_utils import check_int, check_seed, to_container
from .tune_report import EPOCH_COLUMNS, write_search_report

log = logging.getLogger("saferclip.tune")

TUNE_KEYS = ("hparams_search", "n_trials", "world", "seed", "out_dir", "sampler", "pruner", "common")


class MatchedSafetyPruning:
    """After every epoch, reports the trial's objective so far (matched safety over the epochs
    validated until now, :func:`saferclip.evaluation.selection.matched_objective`) to the Optuna
    trial and stops the run (``trainer.should_stop``) when the pruner says so; the objective then
    raises ``TrialPruned``. Keeps every epoch's validation figures (``history``). A Lightning
    callback built lazily so this module imports without Lightning."""

    def __new__(cls, trial: Any, tau: float, rank_by: str | None = None):
        from lightning.pytorch.callbacks import Callback

        from ...evaluation.selection import DEFAULT_RANK_BY, matched_objective, validation_figures

        rank = rank_by or DEFAULT_RANK_BY

        class _Pruning(Callback):
            def __init__(self) -> None:
                self.trial, self.tau, self.pruned, self.epochs = trial, tau, False, 0
                self.history: list[dict[str, Any]] = []

            def on_validation_end(self, trainer, pl_module) -> None:
                if trainer.sanity_checking:
                    return
                metrics = validation_figures(trainer.callback_metrics)
                if not metrics:
                    return
                epoch = int(trainer.current_epoch)
                self.epochs = epoch + 1
                self.history = [h for h in self.history if h["epoch"] != epoch] + [{"epoch": epoch, "metrics": metrics}]
                value = matched_objective(self.history, self.tau, rank)
                if value != value:  # NaN: nothing to report yet
                    return
                self.trial.report(float(value), step=epoch)
                if self.trial.should_prune():
                    self.pruned = True
                    trainer.should_stop = True

        return _Pruning()


def protocol_difference(recorded: str, current: str) -> str:
    """Which fields of two protocol records differ, in words: ``objective: 'matched safety, tau
    0.05' there, 'matched safety, tau 0.05, best by selection_score' here``."""
    try:
        before, now = json.loads(recorded), json.loads(current)
    except (TypeError, ValueError):
        return "its record is not readable"
    keys = [k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]
    return "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} here" for k in keys) or "records differ"


def trial_overrides(cfg: DictConfig, params: list[SearchParam], values: dict[str, Any], common: list[str]) -> list[str]:
    """The training overrides of one trial: the search's base, the common ones, the protocol
    (training seed, tuning world, no export), then the trial's values (last: they win)."""
    protocol = [f"seed={int(cfg.seed)}", f"data.toy_seed={int(cfg.world)}", "export=false"]
    return list(cfg.hparams_search.base) + list(cfg.common) + list(common) + protocol + overrides_of(params, values)


def check_tune_config(cfg: DictConfig) -> list[SearchParam]:
    check_int(cfg.n_trials, "n_trials", 1)
    check_seed(cfg.seed, "seed")
    check_int(cfg.world, "world", 0)
    for key in ("seed", "n_startup_trials"):
        check_int(cfg.sampler.get(key), f"sampler.{key}", 0)
    for key in ("n_startup_trials", "n_warmup_steps"):
        check_int(cfg.pruner.get(key), f"pruner.{key}", 0)
    search = cfg.get("hparams_search")
    if search is None or "name" not in search or "base" not in search:
        raise ConfigError("hparams_search must name a search of conf/hparams_search/ (e.g. hparams_search=safeclip)")
    return parse_search_space(to_container(search.space))


def run(cfg: DictConfig, common: list[str]) -> dict[str, Any]:
    import optuna

    from ...files import file_lock
    from .runs import compose

    params = check_tune_config(cfg)
    check_writable_folder(cfg.out_dir, "out_dir")
    name = str(cfg.hparams_search.name)
    folder = Path(cfg.out_dir).resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    # every trial's config is checked before the first one trains (a typo in `common` or in
    # the space's keys must not wait for a trial to fail): the first values of each choice
    from ..engine.fit import selection_rank_by, selection_tau
    from ..hydra_utils import check_train_config

    probe = {p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in params}
    probe_cfg = compose(
        "train", trial_overrides(cfg, params, {k: v for k, v in probe.items() if _active(params, k, probe)}, common)
    )
    check_train_config(probe_cfg)
    tau = selection_tau(probe_cfg)  # every trial's: `common` and the base set it alike
    rank_by = selection_rank_by(probe_cfg)
    space_record = json.dumps(
        {
            "base": list(cfg.hparams_search.base),
            "space": to_container(cfg.hparams_search.space),
            "world": int(cfg.world),
            "seed": int(cfg.seed),
            "common": list(cfg.common) + common,
            "objective": f"matched safety, tau {tau}, best by {rank_by}",
        },
        sort_keys=True,
    )
    with file_lock(folder / ".study.lock"):  # one search per study at a time
        storage = f"sqlite:///{check_study_db(folder / 'study.db')}"
        try:
            earlier = len(
                optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True).trials
            )
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's DatabaseError (a damaged file), imported with Optuna only
            if type(e).__module__.startswith("sqlalchemy"):
                raise DataFormatError(
                    folder / "study.db",
                    f"not a readable Optuna study ({one_line(e).split(' (Background')[0]}); "
                    "move it away to start a new search, or choose another out_dir",
                ) from None
            raise
        # a resumed search continues the sampler's stream rather than restarting it (seeded
        # alike, a restarted TPE would propose the very first trials again)
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=optuna.samplers.TPESampler(
                seed=int(cfg.sampler.seed) + earlier, n_startup_trials=int(cfg.sampler.n_startup_trials)
            ),
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=int(cfg.pruner.n_startup_trials), n_warmup_steps=int(cfg.pruner.n_warmup_steps)
            ),
        )
        recorded = study.user_attrs.get("protocol")
        if recorded is None:
            study.set_user_attr("protocol", space_record)
        elif recorded != space_record:
            raise ConfigError(
                f"{folder / 'study.db'} holds a study with another search space or protocol "
                f"({protocol_difference(recorded, space_record)}); resume it with the same config, or start a new one "
                f"with another out_dir (or delete that folder)"
            )
        fail_interrupted_trials(study)
        finished = [
            t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ]
        remaining = int(cfg.n_trials) - len(finished)
        if remaining > 0:
            log.info("%s: %d trial(s) to run (%d finished before)", name, remaining, len(finished))
            study.optimize(
                lambda trial: objective(trial, cfg, params, common, folder, tau, rank_by), n_trials=remaining
            )
        return write_search_report(study, cfg, params, folder, tau, rank_by)


SQLITE_HEADER = b"SQLite format 3\x00"


def check_study_db(path: Path) -> Path:
    """``path`` when it is absent (a new search) or an SQLite file (Optuna's storage); else a
    one-line error naming it (Optuna would fail with SQLAlchemy's traceback)."""
    if path.is_dir():
        raise DataFormatError(path, "a folder where the search's SQLite file (study.db) belongs")
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise DataFormatError(
                    path,
                    "not an SQLite database (the search's Optuna storage); move it away to start a new search, or choose another out_dir",
                )
    return path


def _active(params: list[SearchParam], name: str, values: dict[str, Any]) -> bool:
    return next(p for p in params if p.name == name).active(values)


def fail_interrupted_trials(study) -> None:
    """Trials a killed search left RUNNING are marked failed (they are not counted, and rerun)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d was interrupted; marked failed, a new trial takes its place", t.number)


def objective(
    trial, cfg: DictConfig, params: list[SearchParam], common: list[str], folder: Path, tau: float, rank_by: str
) -> float:
    """One trial: train, then score the run at matched safety (module docstring)."""
    import optuna

    from ...evaluation.selection import SELECTION_METRIC, matched_choice, matched_objective
    from ...model.trained import read_selection
    from ..engine.fit import train
    from .runs import compose

    values = sample(trial, params)
    overrides = trial_overrides(cfg, params, values, common)
    train_cfg = compose("train", overrides)
    run_dir = folder / "trials" / f"{trial.number:03d}"
    OmegaConf.update(train_cfg, "paths.run_dir", str(run_dir), force_add=True)
    OmegaConf.update(train_cfg, "force", True, force_add=True)  # the study, not the folder, says what ran
    trial.set_user_attr("overrides", overrides_of(params, values))
    trial.set_user_attr("run_dir", str(run_dir))
    log.info("trial %d: %s", trial.number, " ".join(overrides_of(params, values)))
    pruning = MatchedSafetyPruning(trial, tau, rank_by)
    start = time.time()
    train(train_cfg, extra_callbacks=(pruning,))
    trial.set_user_attr("seconds", round(time.time() - start, 1))
    trial.set_user_attr("epochs", pruning.epochs)
    record = read_selection(run_dir) or {}
    history = record.get("history") or pruning.history
    # every epoch's figures stay with the study (the Pareto front), whatever becomes of the run folder
    trial.set_user_attr(
        "history",
        [{"epoch": h["epoch"], **{k: h["metrics"][k] for k in EPOCH_COLUMNS if k in h["metrics"]}} for h in history],
    )
    choice = matched_choice(history, tau, rank_by)
    if choice is not None:
        trial.set_user_attr(
            "matched", {k: choice[k] for k in ("tau", "reached", "epoch", "unsafe", "U2V", SELECTION_METRIC, "note")}
        )
        trial.set_user_attr("validation", {k: v for k, v in choice["metrics"].items() if isinstance(v, (int, float))})
    if pruning.pruned:
        raise optuna.TrialPruned(f"matched-safety objective below the median after {pruning.epochs} epoch(s)")
    score = matched_objective(history, tau, rank_by)
    if score != score:
        raise RuntimeError(f"trial {trial.number}: the run recorded no validation epoch ({run_dir / 'selection.json'})")
    log.info("trial %d: objective %.4f (%s)", trial.number, score, choice["note"] if choice else "")
    return float(score)

"""saferclip-tune: search one method's hyperparameters with Optuna, on validation only.

    saferclip-tune hparams_search=safeclip          # conf/hparams_search/safeclip.yaml
    saferclip-tune hparams_search=hysac n_trials=20
    saferclip-tune hparams_search=saferclip trainer.max_epochs=4   # any other override goes to every trial

Every trial is one training run composed from the training config tree, exactly as
``saferclip-train <base> <trial values> seed=<seed> data.toy_seed=<world>`` would make it,
scored by its best validation selection score (the checkpoint monitor). The test split is
never read. A median pruner stops a trial whose per-epoch validation score falls below the
median of earlier trials at the same epoch. The study lives in SQLite
(``<out_dir>/<method>/study.db``): a second run of the same command resumes it, counting the
finished trials towards ``n_trials`` (a trial cut off by a crash is marked failed and rerun).

Why not Hydra's Optuna sweeper plugin: its newest release pins Optuna 2.10, whose SQLite
storage fails with SQLAlchemy 2; composing each trial here with Hydra's compose API keeps one
config tree and a current Optuna.

Outputs under ``<out_dir>/<method>/``: ``trials.csv`` (every trial: state, score, values,
epochs, seconds), ``best_experiment.yaml`` (the best trial as an experiment file, ready for
``conf/experiment/``), ``summary.md``, ``history.png`` (score per trial and the best so far)
and ``importance.png`` (Optuna's PED-ANOVA parameter importances).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.records import DataFormatError
from ..errors import ConfigError
from ..training.search_space import SearchParam, overrides_of, parse_search_space, sample
from .cli import check_writable_folder, command, compose_help, one_line, wants_help
from .hydra_utils import CONF_DIR, check_int, check_seed, setup_logging, to_container
from .overrides import check_command

log = logging.getLogger("saferclip.tune")

TUNE_KEYS = ("hparams_search", "n_trials", "world", "seed", "out_dir", "sampler", "pruner", "common")
SELECTION_METRIC = "val/selection_score"


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Overrides of conf/tune.yaml's own keys, and the rest (passed to every trial)."""
    own = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] in TUNE_KEYS]
    return own, [o for o in overrides if o not in own]


class MedianPruning:
    """Reports each epoch's validation selection score to the Optuna trial and stops the run
    (``trainer.should_stop``) when the pruner says so; the objective then raises
    ``TrialPruned``. A Lightning callback built lazily so this module imports without Lightning."""

    def __new__(cls, trial: Any):
        from lightning.pytorch.callbacks import Callback

        class _Pruning(Callback):
            def __init__(self) -> None:
                self.trial, self.pruned, self.epochs = trial, False, 0

            def on_validation_end(self, trainer, pl_module) -> None:
                if trainer.sanity_checking:
                    return
                score = trainer.callback_metrics.get(SELECTION_METRIC)
                if score is None:
                    return
                epoch = int(trainer.current_epoch)
                self.epochs = epoch + 1
                self.trial.report(float(score), step=epoch)
                if self.trial.should_prune():
                    self.pruned = True
                    trainer.should_stop = True

        return _Pruning()


def trial_overrides(cfg: DictConfig, params: list[SearchParam], values: dict[str, Any], common: list[str]) -> list[str]:
    """The training overrides of one trial: the search's base, the common ones, the protocol
    (training seed, tuning world, no export), then the trial's values (last: they win)."""
    protocol = [f"seed={int(cfg.seed)}", f"data.toy_seed={int(cfg.world)}", "export=false"]
    return list(cfg.hparams_search.base) + list(cfg.common) + list(common) + protocol + overrides_of(params, values)


def experiment_yaml(method: str, values_overrides: list[str], score: float, number: int, world: int) -> str:
    """The best trial as an experiment file of ``conf/experiment/`` (toy schedule + the values)."""
    nested = OmegaConf.create({})
    for override in values_overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(nested, key, OmegaConf.create({"v": value_from_override(value)}).v, force_add=True)
    header = (
        "# @package _global_\n"
        f"# {method} on the toy world: the best trial (#{number}) of `saferclip-tune hparams_search={method}`,\n"
        f"# validation selection score {score:.4f} on world {world} (the test split never read).\n"
        "defaults:\n  - toy\n"
        f"  - override /method: {method}\n  - _self_\n"
    )
    return header + OmegaConf.to_yaml(nested).rstrip() + "\n"


def value_from_override(text: str) -> Any:
    return OmegaConf.create(f"v: {text}").v


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

    from ..files import file_lock
    from .main_job import compose

    params = check_tune_config(cfg)
    check_writable_folder(cfg.out_dir, "out_dir")
    name = str(cfg.hparams_search.name)
    folder = Path(cfg.out_dir).resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    # every trial's config is checked before the first one trains (a typo in `common` or in
    # the space's keys must not wait for a trial to fail): the first values of each choice
    from .hydra_utils import check_train_config

    probe = {p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in params}
    check_train_config(compose("train", trial_overrides(cfg, params, {k: v for k, v in probe.items() if _active(params, k, probe)}, common)))
    space_record = json.dumps({"base": list(cfg.hparams_search.base), "space": to_container(cfg.hparams_search.space),
                               "world": int(cfg.world), "seed": int(cfg.seed), "common": list(cfg.common) + common}, sort_keys=True)
    with file_lock(folder / ".study.lock"):  # one search per study at a time
        storage = f"sqlite:///{check_study_db(folder / 'study.db')}"
        try:
            earlier = len(optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True).trials)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's DatabaseError (a damaged file), imported with Optuna only
            if type(e).__module__.startswith("sqlalchemy"):
                raise DataFormatError(folder / "study.db", f"not a readable Optuna study ({one_line(e).split(' (Background')[0]}); "
                                      "move it away to start a new search, or choose another out_dir") from None
            raise
        # a resumed search continues the sampler's stream rather than restarting it (seeded
        # alike, a restarted TPE would propose the very first trials again)
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=optuna.samplers.TPESampler(seed=int(cfg.sampler.seed) + earlier, n_startup_trials=int(cfg.sampler.n_startup_trials)),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=int(cfg.pruner.n_startup_trials), n_warmup_steps=int(cfg.pruner.n_warmup_steps)),
        )
        recorded = study.user_attrs.get("protocol")
        if recorded is None:
            study.set_user_attr("protocol", space_record)
        elif recorded != space_record:
            raise ConfigError(
                f"{folder / 'study.db'} holds a study with another search space or protocol; resume it with the same "
                f"config, or start a new one with another out_dir (or delete that folder)"
            )
        fail_interrupted_trials(study)
        finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        remaining = int(cfg.n_trials) - len(finished)
        if remaining > 0:
            log.info("%s: %d trial(s) to run (%d finished before)", name, remaining, len(finished))
            study.optimize(lambda trial: objective(trial, cfg, params, common, folder), n_trials=remaining)
        return write_search_report(study, cfg, params, common, folder)


SQLITE_HEADER = b"SQLite format 3\x00"


def check_study_db(path: Path) -> Path:
    """``path`` when it is absent (a new search) or an SQLite file (Optuna's storage); else a
    one-line error naming it (Optuna would fail with SQLAlchemy's traceback)."""
    if path.is_dir():
        raise DataFormatError(path, "a folder where the search's SQLite file (study.db) belongs")
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise DataFormatError(path, "not an SQLite database (the search's Optuna storage); move it away to start a new search, or choose another out_dir")
    return path


def _active(params: list[SearchParam], name: str, values: dict[str, Any]) -> bool:
    return next(p for p in params if p.name == name).active(values)


def fail_interrupted_trials(study) -> None:
    """Trials a killed search left RUNNING are marked failed (they are not counted, and rerun)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d was interrupted; marked failed, a new trial takes its place", t.number)


def objective(trial, cfg: DictConfig, params: list[SearchParam], common: list[str], folder: Path) -> float:
    import optuna

    from .main_job import compose
    from .train import train

    values = sample(trial, params)
    overrides = trial_overrides(cfg, params, values, common)
    train_cfg = compose("train", overrides)
    run_dir = folder / "trials" / f"{trial.number:03d}"
    OmegaConf.update(train_cfg, "paths.run_dir", str(run_dir), force_add=True)
    OmegaConf.update(train_cfg, "force", True, force_add=True)  # the study, not the folder, says what ran
    trial.set_user_attr("overrides", overrides_of(params, values))
    trial.set_user_attr("run_dir", str(run_dir))
    log.info("trial %d: %s", trial.number, " ".join(overrides_of(params, values)))
    pruning = MedianPruning(trial)
    start = time.time()
    result = train(train_cfg, extra_callbacks=(pruning,))
    trial.set_user_attr("seconds", round(time.time() - start, 1))
    trial.set_user_attr("epochs", pruning.epochs)
    selection = result.get("selection") or {}
    trial.set_user_attr("selected_epoch", selection.get("epoch"))
    trial.set_user_attr("validation", {k: v for k, v in (selection.get("metrics") or {}).items() if isinstance(v, (int, float))})
    if pruning.pruned:
        raise optuna.TrialPruned(f"validation selection score below the median after {pruning.epochs} epoch(s)")
    score = result.get("best_score")
    if score is None:
        raise RuntimeError(f"trial {trial.number}: the run reported no {SELECTION_METRIC}")
    return float(score)


def write_search_report(study, cfg: DictConfig, params: list[SearchParam], common: list[str], folder: Path) -> dict[str, Any]:
    import optuna

    from ..files import write_text_atomic

    name = str(cfg.hparams_search.name)
    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]
    names = [p.name for p in params]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "score", *names, "epochs", "selected_epoch", "seconds"])
    for t in trials:
        score = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else "")
        writer.writerow([t.number, t.state.name.lower(), score, *[t.params.get(n, "") for n in names],
                         t.user_attrs.get("epochs", ""), t.user_attrs.get("selected_epoch", ""), t.user_attrs.get("seconds", "")])
    write_text_atomic(folder / "trials.csv", buffer.getvalue())
    out: dict[str, Any] = {"folder": str(folder), "trials": len(trials)}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")}
    lines = [f"# saferclip-tune: {name}", "",
             f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed trial(s) of a budget of "
             f"{int(cfg.n_trials)}; world {int(cfg.world)} (training + validation splits), training seed {int(cfg.seed)}; "
             f"objective: the best validation selection score of the run.", ""]
    if complete:
        best = study.best_trial
        text = experiment_yaml(name, best.user_attrs.get("overrides", []), float(best.value), best.number, int(cfg.world))
        write_text_atomic(folder / "best_experiment.yaml", text)
        out.update(best_trial=best.number, best_score=float(best.value), best_overrides=best.user_attrs.get("overrides"))
        lines += [f"Best: trial {best.number}, validation selection score {best.value:.4f}:", "",
                  "    " + " ".join(best.user_attrs.get("overrides", [])), ""]
        validation = best.user_attrs.get("validation") or {}
        if validation:
            lines += ["Its selected epoch's validation metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(validation.items())), ""]
    importances = parameter_importances(study)
    if importances:
        out["importances"] = importances
        lines += ["Parameter importances (PED-ANOVA, complete trials): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()), ""]
    lines += ["Every trial: trials.csv. Plots: history.png, importance.png."]
    write_text_atomic(folder / "summary.md", "\n".join(lines) + "\n")
    plot_search(trials, importances, folder, name)
    out["summary"] = str(folder / "summary.md")
    return out


def parameter_importances(study) -> dict[str, float]:
    """Optuna's PED-ANOVA importances over the complete trials (no scikit-learn needed, unlike
    fANOVA); {} when there are too few."""
    import warnings

    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return {}
    try:
        with warnings.catch_warnings():  # "few trials per regime": said by the trial count in summary.md
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError) as e:
        log.warning("no parameter importances: %s", e)
        return {}


def plot_search(trials: list, importances: dict[str, float], folder: Path, name: str) -> None:
    import optuna

    from ..evaluation.plotting import figure, save_figure

    fig = figure(6.0, 3.5)
    ax = fig.subplots()
    best, best_so_far = None, []
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            ax.scatter([t.number], [t.value], color="C0", zorder=3, label="complete" if "complete" not in _labels(ax) else None)
            best = t.value if best is None else max(best, t.value)
        elif t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.scatter([t.number], [last], color="C3", marker="x", zorder=3, label="pruned (last score)" if "pruned (last score)" not in _labels(ax) else None)
        best_so_far.append((t.number, best))
    points = [(n, b) for n, b in best_so_far if b is not None]
    if points:
        ax.step([n for n, _ in points], [b for _, b in points], where="post", color="C0", alpha=0.5, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation selection score")
    ax.set_title(f"saferclip-tune: {name}")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, folder / "history.png")
    fig = figure(6.0, 3.0)
    ax = fig.subplots()
    if importances:
        keys = list(importances)[::-1]
        ax.barh(keys, [importances[k] for k in keys], color="C0")
        ax.set_xlabel("importance (PED-ANOVA)")
    else:
        ax.text(0.5, 0.5, "too few complete trials for importances", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{name}: parameter importances")
    save_figure(fig, folder / "importance.png")


def _labels(ax) -> set[str]:
    return {c.get_label() for c in ax.collections}


TUNE_HELP = {
    "hparams_search": "the search: safeclip | saferclip | hysac (conf/hparams_search/<name>.yaml)",
    "n_trials": "trials per search, the same for every method (complete + pruned; resumes count earlier ones)",
    "world": "the toy world tuning trains and validates on (0; the test worlds 1, 2, 3 stay unseen)",
    "seed": "the training seed of every trial",
    "out_dir": "where the study (SQLite), its trials and its report go (outputs/tune)",
    "sampler": "TPE sampler: seed, n_startup_trials (random trials first)",
    "pruner": "median pruner: n_startup_trials, n_warmup_steps (epochs before pruning)",
    "common": "overrides of the training config for every trial",
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(compose_help("saferclip-tune", __doc__.splitlines()[0], "tune", TUNE_HELP))
        return 0
    return command("saferclip-tune", lambda: _run_and_print(overrides))


def _run_and_print(overrides: list[str]) -> None:
    from hydra import initialize_config_dir

    from .main_job import compose

    setup_logging()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        import optuna
    except ImportError:
        raise ConfigError("saferclip-tune needs Optuna: pip install 'saferclip[tune]' (or pip install 'optuna>=4')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # saferclip's own line per trial says it
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        check_command("saferclip-tune", "tune", overrides, TUNE_KEYS)  # every key and group, before any work
        own, rest = split_overrides(overrides)
        out = run(compose("tune", own), rest)
    print(Path(out["summary"]).read_text(), end="")


if __name__ == "__main__":
    sys.exit(main())

"""What ``saferclip-tune`` writes about a search (:mod:`saferclip.app.pipelines.tune`): tables, summary, plots.

Under ``<out_dir>/<method>/``:

* ``trials.csv``: one row per trial: state, objective (matched safety; a pruned trial's last
  reported value), the searched values, whether it reached τ, the kept epoch and its validation
  unsafe rate and U->V, epochs run, seconds;
* ``trials_epochs.csv``: one row per trial x validated epoch: the validation figures of
  :data:`EPOCH_COLUMNS` (the Pareto front's points; pruned trials included);
* ``best_experiment.yaml``, ``summary.md``, ``search.json`` (:func:`saferclip.evaluation.searches.search_record`: all of the above), ``history.png``, ``importance.png``;
* ``pareto.png``: validation unsafe rate (a) against U->V R@1 over every trial x epoch, the
  Pareto front (no point both safer and better at redirection) drawn, in the method family's
  colour (:func:`saferclip.evaluation.plotting.model_styles`). :func:`plot_pareto` draws several
  searches in one plot, e.g. all three methods for a report::

      from saferclip.app.pipelines.tune_report import pareto_points
      from saferclip.evaluation.searches import plot_pareto
      plot_pareto({m: pareto_points(f"outputs/tune/{m}") for m in ("safeclip", "saferclip", "hysac")}, "pareto.png")
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...evaluation.searches import EPOCH_COLUMNS, SEARCH_FILE, plot_pareto, search_record
from ...evaluation.selection import DEFAULT_RANK_BY, REDIRECTION_KEY, SELECTION_METRIC
from ...training.search_space import SearchParam

# how the summary names what ranked the epochs at most τ unsafe (selection.rank_by)
RANK_WORDS = {SELECTION_METRIC: "validation selection score", REDIRECTION_KEY: "validation U→V R@1"}

log = logging.getLogger("saferclip.tune")


def experiment_yaml(
    method: str, values_overrides: list[str], score: float, number: int, world: int, tau: float | None = None
) -> str:
    """The best trial as an experiment file of ``conf/experiment/`` (toy schedule + the values)."""
    nested = OmegaConf.create({})
    for override in values_overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(nested, key, OmegaConf.create({"v": value_from_override(value)}).v, force_add=True)
    objective = "matched-safety objective" + (f" (tau {tau:g})" if tau is not None else "")
    header = (
        "# @package _global_\n"
        f"# {method} on the toy world: the best trial (#{number}) of `saferclip-tune hparams_search={method}`,\n"
        f"# validation {objective} {score:.4f} on world {world} (the test split never read).\n"
        "defaults:\n  - toy\n"
        f"  - override /method: {method}\n  - _self_\n"
    )
    return header + OmegaConf.to_yaml(nested).rstrip() + "\n"


def value_from_override(text: str) -> Any:
    return OmegaConf.create(f"v: {text}").v


def _trial_value(t) -> Any:
    if t.value is not None:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else ""


def write_search_report(
    study, cfg: DictConfig, params: list[SearchParam], folder: Path, tau: float, rank_by: str = DEFAULT_RANK_BY
) -> dict[str, Any]:
    import optuna

    from ...files import write_json_atomic, write_text_atomic

    name = str(cfg.hparams_search.name)
    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]
    names = [p.name for p in params]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "trial",
            "state",
            "objective",
            *names,
            "reached_tau",
            "kept_epoch",
            "val_unsafe",
            "val_U2V",
            "epochs",
            "seconds",
        ]
    )
    for t in trials:
        matched = t.user_attrs.get("matched") or {}
        writer.writerow(
            [
                t.number,
                t.state.name.lower(),
                _trial_value(t),
                *[t.params.get(n, "") for n in names],
                "" if matched.get("reached") is None else matched["reached"],
                matched.get("epoch", ""),
                _blank(matched.get("unsafe")),
                _blank(matched.get("U2V")),
                t.user_attrs.get("epochs", ""),
                t.user_attrs.get("seconds", ""),
            ]
        )
    write_text_atomic(folder / "trials.csv", buffer.getvalue())
    points = epoch_rows(trials)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["trial", "state", "epoch", *EPOCH_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(points)
    write_text_atomic(folder / "trials_epochs.csv", buffer.getvalue())

    out: dict[str, Any] = {"folder": str(folder), "trials": len(trials)}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")}
    reached = sum(1 for t in complete if (t.user_attrs.get("matched") or {}).get("reached"))
    seconds = sum(float(t.user_attrs.get("seconds") or 0) for t in trials)
    lines = [
        f"# saferclip-tune: {name}",
        "",
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed trial(s) of a budget of "
        f"{int(cfg.n_trials)} ({int(cfg.sampler.n_startup_trials)} random, then TPE); {seconds / 60:.1f} min of training; "
        f"world {int(cfg.world)} (training + validation splits), training seed {int(cfg.seed)}.",
        "",
        f"Objective: matched safety at τ = {100 * tau:g}%: the validation selection score of the epoch with the best "
        f"{RANK_WORDS.get(rank_by, rank_by)} among the epochs with unsafe rate (a) ≤ τ; a run that never reaches τ "
        f"scores its safest epoch's selection score − 1. {reached} of {counts['complete']} complete trial(s) reached τ.",
        "",
    ]
    if complete:
        best = study.best_trial
        text = experiment_yaml(
            name, best.user_attrs.get("overrides", []), float(best.value), best.number, int(cfg.world), tau
        )
        write_text_atomic(folder / "best_experiment.yaml", text)
        matched = best.user_attrs.get("matched") or {}
        out.update(
            best_trial=best.number,
            best_score=float(best.value),
            best_overrides=best.user_attrs.get("overrides"),
            best_matched=matched,
        )
        lines += [
            f"Best: trial {best.number}, objective {best.value:.4f} ({matched.get('note', 'no note')}):",
            "",
            "    " + " ".join(best.user_attrs.get("overrides", [])),
            "",
        ]
        validation = best.user_attrs.get("validation") or {}
        if validation:
            lines += [
                "Its kept epoch's validation metrics: "
                + ", ".join(f"{k} {v:.3f}" for k, v in sorted(validation.items())),
                "",
            ]
    importances = parameter_importances(study)
    if importances:
        out["importances"] = importances
        lines += [
            "Parameter importances (PED-ANOVA, complete trials): "
            + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()),
            "",
        ]
    lines += [
        "Every trial: trials.csv; every trial's every epoch: trials_epochs.csv; all of it: search.json. "
        "Plots: history.png, importance.png, pareto.png."
    ]
    write_text_atomic(folder / "summary.md", "\n".join(lines) + "\n")
    record = search_record(
        name,
        trial_dicts(trials),
        budget=int(cfg.n_trials),
        random_trials=int(cfg.sampler.n_startup_trials),
        tau=tau,
        rank_by=rank_by,
        world=int(cfg.world),
        seed=int(cfg.seed),
        importances=importances,
        best=(
            {
                "number": out["best_trial"],
                "value": out["best_score"],
                "overrides": out["best_overrides"],
                "matched": out["best_matched"],
                "validation": study.best_trial.user_attrs.get("validation") or {},
            }
            if "best_trial" in out
            else None
        ),
    )
    write_json_atomic(folder / SEARCH_FILE, record)
    plot_search(trials, importances, folder, name)
    plot_pareto({name: points}, folder / "pareto.png", tau)
    out["summary"] = str(folder / "summary.md")
    return out


def _blank(value: Any) -> Any:
    return "" if value is None else value


def trial_dicts(trials: Sequence) -> list[dict[str, Any]]:
    """Optuna's finished trials as the plain dicts :func:`saferclip.evaluation.searches.search_record` takes."""
    out = []
    for t in trials:
        value = _trial_value(t)
        out.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": None if value == "" else float(value),
                "params": dict(t.params),
                "matched": t.user_attrs.get("matched"),
                "seconds": t.user_attrs.get("seconds"),
                "epochs": t.user_attrs.get("epochs"),
                "start": t.datetime_start.isoformat() if t.datetime_start else None,
                "end": t.datetime_complete.isoformat() if t.datetime_complete else None,
                "history": t.user_attrs.get("history") or [],
            }
        )
    return out


def epoch_rows(trials: Sequence) -> list[dict[str, Any]]:
    """``[{"trial", "state", "epoch", <EPOCH_COLUMNS>}]``: every trial's every validated epoch
    (from the trial's ``history`` attribute, kept by the objective)."""
    rows = []
    for t in trials:
        for h in t.user_attrs.get("history") or []:
            rows.append(
                {
                    "trial": t.number,
                    "state": t.state.name.lower(),
                    "epoch": h.get("epoch"),
                    **{k: _blank(h.get(k)) for k in EPOCH_COLUMNS},
                }
            )
    return rows


def pareto_points(folder: str | Path) -> list[dict[str, Any]]:
    """A search folder's ``trials_epochs.csv`` as rows (numbers as floats; blanks as None)."""
    with open(Path(folder) / "trials_epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("trial", "epoch"):
            r[k] = int(r[k])
        for k in EPOCH_COLUMNS:
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return rows


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

    from ...evaluation.plotting import figure, save_figure

    fig = figure(6.0, 3.5)
    ax = fig.subplots()
    best, best_so_far = None, []
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            ax.scatter(
                [t.number], [t.value], color="C0", zorder=3, label="complete" if "complete" not in _labels(ax) else None
            )
            best = t.value if best is None else max(best, t.value)
        elif t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.scatter(
                [t.number],
                [last],
                color="C3",
                marker="x",
                zorder=3,
                label="pruned (last value)" if "pruned (last value)" not in _labels(ax) else None,
            )
        best_so_far.append((t.number, best))
    points = [(n, b) for n, b in best_so_far if b is not None]
    if points:
        ax.step(
            [n for n, _ in points], [b for _, b in points], where="post", color="C0", alpha=0.5, label="best so far"
        )
    ax.axhline(0.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("trial")
    ax.set_ylabel("matched-safety objective\n(< 0: never reached τ)")
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


__all__ = ["EPOCH_COLUMNS", "epoch_rows", "experiment_yaml", "pareto_points", "trial_dicts", "write_search_report"]

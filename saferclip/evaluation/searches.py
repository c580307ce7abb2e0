"""The hyperparameter searches' record (``search.json``, written by ``saferclip-tune`` beside its
summary) and what docs/RESULTS.md shows of them: one table of the three searches, each best
trial's setting, and their Pareto fronts in one plot.

A search record (:func:`search_record`, from plain per-trial dicts so that this module needs no
Optuna) holds the budget and protocol, the trial counts (complete, pruned, failed), how many
trials were random and how many TPE-guided, training and wall time, how many complete trials
reached τ, the best trial (its overrides and what matched safety kept), the parameter
importances, every trial and every trial × epoch's validation figures (the Pareto points).
``docs/results/searches.json`` (``scripts/search_results.py``) gathers the three records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .selection import MATCHED_METRIC, REDIRECTION_KEY, SELECTION_METRIC, UNSAFE_KEY, pareto_front

# the search's name -> the model name its colour comes from (HySAC validates in its safe mode)
FAMILY = {"safeclip": "Safe-CLIP", "saferclip": "SafeR-CLIP", "hysac": "HySAC (safe)"}
EPOCH_COLUMNS = (UNSAFE_KEY, REDIRECTION_KEY, "S2V_R@1", "nsfw_caps_S2V_R@1", SELECTION_METRIC, MATCHED_METRIC)
SEARCH_FILE = "search.json"
RUN = "saferclip-tune hparams_search=<method>"


class SearchSummaryError(ValueError):
    """A searches file the docs cannot use (one line naming what is wrong)."""


def search_record(
    name: str,
    trials: Sequence[Mapping[str, Any]],
    *,
    budget: int,
    random_trials: int,
    tau: float,
    world: int,
    seed: int,
    importances: Mapping[str, float] | None = None,
    best: Mapping[str, Any] | None = None,
    rank_by: str | None = None,
) -> dict[str, Any]:
    """One search's record (module docstring). ``trials``: one dict per trial that is not
    running, ``{"number", "state" (complete|pruned|fail), "value", "params", "matched",
    "seconds", "epochs", "start", "end" (ISO times or None), "history" ([{epoch, metrics…}])}``;
    ``best``: the best trial's ``{"number", "value", "overrides", "matched", "validation"}``;
    ``rank_by``: what ranked the epochs at most τ unsafe (``selection.rank_by``; a record
    without it was made when U→V alone ranked them)."""
    counts = {s: sum(1 for t in trials if t["state"] == s) for s in ("complete", "pruned", "fail")}
    finished = counts["complete"] + counts["pruned"]
    times = [datetime.fromisoformat(t[k]) for t in trials for k in ("start", "end") if t.get(k)]
    epochs = [
        {"trial": t["number"], "state": t["state"], "epoch": h.get("epoch"), **{k: h.get(k) for k in EPOCH_COLUMNS}}
        for t in trials
        for h in t.get("history") or []
    ]
    return {
        "name": name,
        "budget": int(budget),
        "tau": float(tau),
        "rank_by": rank_by,
        "world": int(world),
        "seed": int(seed),
        "counts": counts,
        # the sampler proposes at random until `random_trials` trials have finished, then by TPE
        "random_trials": min(int(random_trials), finished),
        "tpe_trials": max(0, finished - int(random_trials)),
        "training_seconds": round(sum(float(t.get("seconds") or 0) for t in trials), 1),
        "wall_seconds": round((max(times) - min(times)).total_seconds(), 1) if times else None,
        "reached": sum(1 for t in trials if t["state"] == "complete" and (t.get("matched") or {}).get("reached")),
        "best": dict(best) if best else None,
        "importances": dict(importances or {}),
        "trials": [{k: v for k, v in t.items() if k != "history"} for t in trials],
        "epochs": epochs,
    }


def plot_pareto(
    points_by_search: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, tau: float | None = None
) -> Path:
    """Validation unsafe rate (a) against U->V R@1, one point per trial x epoch, one colour per
    method family, each search's Pareto front drawn as a step line; τ as a dashed line."""
    from .plotting import figure, model_styles, save_figure

    styles = model_styles([FAMILY.get(n, n) for n in points_by_search])
    fig = figure(7.6, 4.0)
    ax = fig.subplots()
    top = 0.0
    for name, points in points_by_search.items():
        xy = [
            (100 * p[UNSAFE_KEY], 100 * p[REDIRECTION_KEY])
            for p in points
            if p.get(UNSAFE_KEY) is not None and p.get(REDIRECTION_KEY) is not None
        ]
        label = FAMILY.get(name, name)
        colour = styles[label]["color"]
        if not xy:
            continue
        top = max(top, max(y for _, y in xy))
        trials = len({p.get("trial") for p in points})
        ax.scatter(
            [x for x, _ in xy],
            [y for _, y in xy],
            s=12,
            alpha=0.35,
            color=colour,
            label=f"{label}: {len(xy)} epochs of {trials} trial(s)",
        )
        front = sorted((xy[i] for i in pareto_front([(x / 100, y / 100) for x, y in xy])), key=lambda p: p[0])
        ax.step(
            [x for x, _ in front],
            [y for _, y in front],
            where="post",
            color=colour,
            linewidth=1.8,
            label=f"{label}: Pareto front",
        )
        # the front's points themselves: a front of one point draws no line
        ax.scatter(
            [x for x, _ in front], [y for _, y in front], s=40, facecolors="none", edgecolors=colour, linewidths=1.5
        )
    if tau is not None:
        ax.axvline(100 * tau, color="black", linestyle="--", linewidth=0.8, label=f"τ = {100 * tau:g}%")
    # Matched safety is decided below τ (a few per cent), where most good epochs crowd: a
    # symmetric-log axis gives 0..5% as much room as 5..100%.
    ax.set_xscale("symlog", linthresh=5, linscale=1.0)
    ax.set_xticks([0, 1, 2, 5, 10, 20, 50, 100])
    ax.set_xticklabels(["0", "1", "2", "5", "10", "20", "50", "100"])
    ax.set_xlim(-0.3, 105)
    ax.set_xlabel("validation unsafe rate (a) %  (lower is safer; linear to 5%, logarithmic above)")
    ax.set_ylabel("validation U→V R@1 %")
    ax.set_ylim(-1, min(102.0, 10 * math.ceil(top * 1.1 / 10)) if top > 0 else 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("every trial × epoch of the search" + ("es" if len(points_by_search) > 1 else ""))
    path = Path(path)
    save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------- docs
ORDER = ("safeclip", "saferclip", "hysac")


def _searches(data: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    searches = data.get("searches")
    if not isinstance(searches, Mapping) or not searches:
        raise SearchSummaryError('no searches (expected {"searches": {method: record}})')
    return dict(sorted(searches.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def searches_table(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """One row per search: trials (complete / pruned / failed) of the budget, random then
    TPE-guided, training and wall time, complete trials that reached τ, the best trial and what
    matched safety kept of it (validation)."""
    lines = [
        "| search | trials: complete / pruned / failed (budget) | random + TPE-guided | training time | wall time "
        "| complete trials reaching τ | best trial: kept epoch (validation) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in _searches(data).items():
        c = s["counts"]
        best = s.get("best") or {}
        matched = best.get("matched") or {}
        best_cell = f"#{best['number']}: {matched.get('note', '–')}" if best else "–"
        lines.append(
            f"| {FAMILY.get(name, name).replace(' (safe)', '')} | {c['complete']} / {c['pruned']} / {c['fail']} ({s['budget']}) "
            f"| {s['random_trials']} + {s['tpe_trials']} | {_hours(s.get('training_seconds'))} | {_hours(s.get('wall_seconds'))} "
            f"| {s['reached']} of {c['complete']} | {best_cell} |"
        )
    return "\n".join(lines)


def searches_best(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """``method=``: the best trial's overrides, as `code`."""
    name = args.get("method")
    searches = _searches(data)
    if name not in searches:
        raise SearchSummaryError(f"no search {name!r} (searches: {', '.join(searches)})")
    best = searches[name].get("best")
    if not best:
        raise SearchSummaryError(f"search {name!r} has no complete trial")
    return " ".join(f"`{_readable(o)}`" for o in best.get("overrides") or [])


def _readable(override: str) -> str:
    """``key=0.0005153527932385145`` -> ``key=0.000515``: three significant digits are what a
    search's resolution supports; the exact values stay in searches.json and the experiment file."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    if not sep or value.strip().lstrip("-").isdigit():
        return override
    return f"{key}={number:.3g}"


def draw_pareto_fronts(data: Mapping[str, Any], path: Path) -> None:
    """docs/img/search_pareto.png: every search's trial × epoch points and Pareto front."""
    searches = _searches(data)
    taus = {float(s["tau"]) for s in searches.values()}
    points = {name: [p for p in s.get("epochs") or [] if _finite(p.get(UNSAFE_KEY))] for name, s in searches.items()}
    plot_pareto(points, path, taus.pop() if len(taus) == 1 else None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def pending(name: str, block: bool) -> str:
    """What a region shows until ``docs/results/searches.json`` is committed."""
    if not block:
        return "not yet measured"
    return (
        f"*Not yet measured: the three searches (`{RUN}`, 20 trials each, resumable) run in the background; "
        "`python scripts/search_results.py` gathers them and "
        "`python scripts/update_doc_tables.py --from searches=outputs/tune/searches.json` shows them here.*"
    )


PARETO_CAPTION = (
    "Every trial × epoch of the three searches: validation unsafe rate (a) against U→V R@1, each search's "
    "Pareto front drawn (no point is both safer and better at redirection), τ dashed"
)


def searches_front(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """``method=``: the point of the search's Pareto front at τ: the best validation U→V of any
    trial × epoch at most τ unsafe, ``U→V 23.2 at 1.4% unsafe (trial 12, epoch 4)``."""
    name = args.get("method")
    searches = _searches(data)
    if name not in searches:
        raise SearchSummaryError(f"no search {name!r} (searches: {', '.join(searches)})")
    search = searches[name]
    tau = float(search["tau"])
    safe = [
        p
        for p in search.get("epochs") or []
        if _finite(p.get(UNSAFE_KEY)) and _finite(p.get(REDIRECTION_KEY)) and p[UNSAFE_KEY] <= tau + 1e-6
    ]
    if not safe:
        return f"no epoch reached τ = {100 * tau:g}%"
    best = max(safe, key=lambda p: (p[REDIRECTION_KEY], -p[UNSAFE_KEY]))
    return (
        f"U→V {100 * best[REDIRECTION_KEY]:.1f} at {100 * best[UNSAFE_KEY]:.1f}% unsafe "
        f"(trial {best['trial']}, epoch {best['epoch']})"
    )


GENERATORS = {
    "searches-table": (searches_table, True),
    "searches-best": (searches_best, False),
    "searches-front": (searches_front, False),
}

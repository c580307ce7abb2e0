"""The main job's and the study's generated regions (``main-*``: ``docs/results/main.json``, the
``results.json`` a ``saferclip-main`` report writes; ``study-*``: ``docs/results/study.json``,
``saferclip-study``'s): each generator takes the result file and a region's ``key=value``
arguments and returns the region's text. :mod:`saferclip.evaluation.doc_tables` lists what each
one takes and writes them into the documents."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import SaferclipError
from .headline import HEADLINE, headline, headline_table
from .headline import study_table as headline_study_table
from .intervals import difference_cell, differences_table, intervals_note
from .targets import verdict


class MainTableError(SaferclipError):
    """A region's arguments or a result file a main-job or study generator cannot use (one line
    naming it)."""


DISPLAY_NAMES = {
    "safeclip": "Safe-CLIP",
    "saferclip": "SafeR-CLIP",
    "hysac_safe": "HySAC safe",
    "hysac_moderation": "HySAC moderation",
}


def display(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def display_pair(pair: str) -> str:
    return " vs ".join(display(p) for p in pair.split(" vs "))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _list(args: Mapping[str, str], key: str) -> list[str] | None:
    return [v.strip() for v in args[key].split(",") if v.strip()] if args.get(key) else None


def _need(args: Mapping[str, str], *keys: str) -> list[str]:
    missing = [k for k in keys if not args.get(k)]
    if missing:
        raise MainTableError(f"needs the argument(s) {', '.join(f'{k}=' for k in missing)}")
    return [args[k] for k in keys]


# ----------------------------------------------------------------------------- the main job
def _model_results(results: Mapping[str, Any], model: str) -> Mapping[str, Any]:
    if model not in (results.get("results") or {}):
        raise MainTableError(f"no model {model!r} in the results (models: {', '.join(results.get('results') or {})})")
    return results["results"][model]


def _figure(results: Mapping[str, Any], model: str, key: str) -> float:
    if key not in HEADLINE:
        raise MainTableError(f"unknown headline key {key!r}; expected one of {', '.join(HEADLINE)}")
    figures = headline(_model_results(results, model))
    if key not in figures:
        raise MainTableError(f"model {model!r} has no {key!r}")
    return figures[key]


def renamed(results: Mapping[str, Any], models: list[str] | None = None) -> dict[str, Any]:
    """``results`` with only ``models`` (default all), in that order, under their display names."""
    models = models or list(results.get("results") or {})
    for m in models:
        _model_results(results, m)
    out = dict(results)
    for section in ("results", "intervals", "models"):
        values = results.get(section) or {}
        out[section] = {display(m): values[m] for m in models if m in values}
    return out


def _run_of(model: str, training: Mapping[str, Any]) -> str | None:
    """The training run behind an evaluated model (``hysac_safe`` -> ``hysac``)."""
    if model in training:
        return model
    base = model.rsplit("_", 1)[0]
    return base if base in training else None


def exported_epoch(record: Mapping[str, Any]) -> str:
    selected = record.get("selected") or {}
    return f"{selected.get('epoch', '–')} ({len(record.get('history') or [])})"


def main_table(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    models = _list(args, "models") or list(results.get("results") or {})
    keys = _list(args, "keys")
    view = renamed(results, models)
    if keys:
        unknown = [k for k in keys if k not in HEADLINE]
        if unknown:
            raise MainTableError(f"unknown headline keys {unknown}; expected some of {', '.join(HEADLINE)}")
    table = headline_table(view, keys=keys)
    if args.get("epochs") == "yes":
        training = results.get("training") or {}
        cells, seen = [], set()
        for m in models:
            run = _run_of(m, training)
            if run is None:
                cells.append("–")
            else:
                cells.append("(same)" if run in seen else exported_epoch(training[run]))
                seen.add(run)
        row = "| exported epoch, counted from 0 (epochs run) | " + " | ".join(cells) + " |"
        lines = table.split("\n")
        end = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
        table = "\n".join([*lines[:end], row, *lines[end:]])
    return table


def main_differences(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    differences = results.get("differences") or {}
    pairs = _list(args, "pairs") or list(differences)
    missing = [p for p in pairs if p not in differences]
    if missing:
        raise MainTableError(f"no paired differences {missing} (pairs: {', '.join(differences)})")
    return differences_table({display_pair(p): differences[p] for p in pairs})


def main_value(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    model, key = _need(args, "model", "key")
    value = _pct(_figure(results, model, key))
    if args.get("interval") == "yes":
        interval = ((results.get("intervals") or {}).get(model) or {}).get(key)
        if not interval:
            raise MainTableError(f"model {model!r} has no interval of {key!r}")
        value += f" [{_pct(interval[0])}, {_pct(interval[1])}]"
    return value


def main_difference(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    pair, key = _need(args, "pair", "key")
    d = ((results.get("differences") or {}).get(pair) or {}).get(key)
    if d is None:
        raise MainTableError(f"no paired difference {pair!r} of {key!r}")
    return difference_cell(d)


def main_share(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    model, of, key = _need(args, "model", "of", "key")
    return f"{100 * _figure(results, model, key) / _figure(results, of, key):.0f}%"


def main_epoch(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    (run,) = _need(args, "run")
    record = (results.get("training") or {}).get(run)
    if not record:
        raise MainTableError(f"no training record of run {run!r}")
    selected = record.get("selected") or {}
    return f"epoch {selected.get('epoch')} of {len(record.get('history') or [])} run (counted from 0)"


def main_matched(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """What matched safety kept for a run, as its training recorded it: ``reached τ = 5%: 0.2%
    unsafe at U→V 23.0 (epoch 9)`` or ``never reached τ = 5%; safest: …`` (validation split)."""
    (run,) = _need(args, "run")
    record = (results.get("training") or {}).get(run)
    if not record:
        raise MainTableError(f"no training record of run {run!r}")
    matched = record.get("matched_safety") or {}
    if not matched.get("note"):
        raise MainTableError(f"run {run!r} records no matched-safety choice (training.{run}.matched_safety)")
    return str(matched["note"])


def minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def main_seconds(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """How long the run took: a part (a run's training as it was timed when it trained, even
    when this job reused it; ``evaluation``), or all of them."""
    meta = results.get("meta") or {}
    timings = {
        **(meta.get("timings_seconds") or {}),
        **{k: v for k, v in (meta.get("train_seconds") or {}).items() if v is not None},
    }
    if not timings:
        raise MainTableError("the results record no timings (meta.timings_seconds)")
    part = args.get("part")
    if part and part not in timings:
        raise MainTableError(f"no timing {part!r} (timings: {', '.join(timings)})")
    return minutes(timings[part] if part else sum(timings.values()))


def main_setting(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    (field,) = _need(args, "field")
    meta = results.get("meta") or {}
    values = {
        "world": meta.get("world"),
        "seed": meta.get("seed"),
        "split": meta.get("split"),
        "date": str(meta.get("created", ""))[:10],
    }
    if field not in values or values[field] in (None, ""):
        raise MainTableError(
            f"field must be one of {', '.join(values)} and recorded in the results' meta, got {field!r}"
        )
    return str(values[field])


def main_intervals(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    return intervals_note(results)


def main_target(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """A figure against a target in %: ``met: 0.6 [0.1, 1.7] ≤ 5`` or ``missed: 77.4 [73.8,
    81.0] against ≥ 80 (2.6 points short)``; with ``of=<model>`` the target is a share of that
    model's figure: ``missed: 27% of original's against ≥ 90% (63 points short)``."""
    model, key = _need(args, "model", "key")
    bounds = [(op, args[op]) for op in ("at-least", "at-most") if args.get(op)]
    if len(bounds) != 1:
        raise MainTableError("needs one of at-least= or at-most= (the target, in %)")
    (op, raw), value = bounds[0], 100 * _figure(results, model, key)
    try:
        target = float(raw)
    except ValueError:
        raise MainTableError(f"{op}= must be a number (in %), got {raw!r}") from None
    of = args.get("of")
    if of:
        reference = 100 * _figure(results, of, key)
        if reference == 0:
            raise MainTableError(f"model {of!r} scores 0 on {key!r}: no share of it to compare")
        share = round(100 * value / reference)
        shown = f"{share}% of {display(of)}'s ({_pct(value / 100)} against {_pct(reference / 100)})"
        return verdict(shown, share, op, target, bound_text=f"{raw}%", digits=0)
    shown = main_value(
        results,
        {
            "model": model,
            "key": key,
            "interval": "yes" if ((results.get("intervals") or {}).get(model) or {}).get(key) else "",
        },
    )
    return verdict(shown, value, op, target, bound_text=raw)


def main_history(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """A run's validation ``metric`` epoch by epoch in % (``92.8 → 64.0 → …``), from epoch
    ``from`` (default 0); ``range=yes``: the lowest and highest (``81.2–84.6``)."""
    run, metric = _need(args, "run", "metric")
    record = (results.get("training") or {}).get(run)
    if not record:
        raise MainTableError(f"no training record of run {run!r}")
    start = int(args.get("from", 0))
    values = [h.get("metrics", {}).get(metric) for h in record.get("history") or []][start:]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        raise MainTableError(f"run {run!r} has no validation {metric!r} for every epoch from {start}")
    if args.get("range") == "yes":
        return f"{_pct(min(values))}–{_pct(max(values))}"
    return " → ".join(_pct(v) for v in values)


def main_metric(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """Any metric of a model's results in % (``suite=zeroshot`` needs ``task=``)."""
    model, suite, metric = _need(args, "model", "suite", "metric")
    found = _model_results(results, model).get(suite) or {}
    if suite == "zeroshot":
        (task,) = _need(args, "task")
        found = found.get(task) or {}
    value = found.get(metric)
    if not isinstance(value, (int, float)):
        raise MainTableError(f"model {model!r} has no {suite} {args.get('task', '')} {metric!r}".replace("  ", " "))
    return _pct(value)


# ----------------------------------------------------------------------------- the study
def _summary(study: Mapping[str, Any]) -> Mapping[str, Any]:
    summary = study.get("summary")
    if not isinstance(summary, Mapping):
        raise MainTableError("the study file has no summary (a saferclip-study study.json has)")
    return summary


def study_table(study: Mapping[str, Any], args: Mapping[str, str]) -> str:
    summary = _summary(study)
    models = _list(args, "models") or list(summary)
    keys = _list(args, "keys")
    missing = [m for m in models if m not in summary]
    if missing:
        raise MainTableError(f"no models {missing} in the study (models: {', '.join(summary)})")
    rows = {display(m): ({k: v for k, v in summary[m].items() if k in keys} if keys else summary[m]) for m in models}
    return headline_study_table(rows)


def study_differences(study: Mapping[str, Any], args: Mapping[str, str]) -> str:
    return main_differences(study, args)


def study_value(study: Mapping[str, Any], args: Mapping[str, str]) -> str:
    model, key = _need(args, "model", "key")
    row = (_summary(study).get(model) or {}).get(key)
    if row is None:
        raise MainTableError(f"the study has no {key!r} of model {model!r}")
    stat = args.get("stat", "mean")
    if stat == "interval":
        return "–" if math.isnan(float(row.get("low", math.nan))) else f"[{_pct(row['low'])}, {_pct(row['high'])}]"
    if stat not in ("mean", "std"):
        raise MainTableError(f"stat must be mean, std or interval, got {stat!r}")
    return _pct(row[stat])


GENERATORS: dict[str, tuple[str, Callable[[Mapping[str, Any], Mapping[str, str]], str], bool]] = {
    # name -> (source, generator, block: its own lines between the markers)
    "main-table": ("main", main_table, True),
    "main-differences": ("main", main_differences, True),
    "main-value": ("main", main_value, False),
    "main-difference": ("main", main_difference, False),
    "main-share": ("main", main_share, False),
    "main-epoch": ("main", main_epoch, False),
    "main-matched": ("main", main_matched, False),
    "main-seconds": ("main", main_seconds, False),
    "main-setting": ("main", main_setting, False),
    "main-intervals": ("main", main_intervals, False),
    "main-target": ("main", main_target, False),
    "main-history": ("main", main_history, False),
    "main-metric": ("main", main_metric, False),
    "study-table": ("study", study_table, True),
    "study-differences": ("study", study_differences, True),
    "study-value": ("study", study_value, False),
}

__all__ = ["GENERATORS", "MainTableError", "display"]

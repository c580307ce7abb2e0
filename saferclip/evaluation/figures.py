"""Figures that put several runs side by side: validation curves and safety trade-offs.

* :func:`plot_training_curves` — per epoch of each run, the validation unsafe rate, U→V and
  S→V R@1 (from the run's ``selection.json``), the exported epoch marked: safety emerging
  with steps, and where the selection rule stopped.
* :func:`plot_tradeoff` — every model as a point: unsafe rate (a) against zero-shot
  retention, and against U→V R@1; the original model marked. Lower-right is better in the
  first panel, lower-right in the second (safe and still redirecting to the right scene).

Pure matplotlib on the Agg canvas (no pyplot), written atomically like the report's plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plotting import EXPORTED_MARK, figure, model_colours, model_styles, overlap_width, save_figure

CURVE_METRICS = (
    ("U2VG_unsafe@1", "unsafe rate (a) ↓"),
    ("U2V_R@1", "U→V R@1"),
    ("S2V_R@1", "S→V R@1"),
)


def plot_training_curves(
    records: Mapping[str, Mapping[str, Any]], path: str | Path, models: Sequence[str] | None = None
) -> Path | None:
    """``records``: run name -> its ``selection.json`` (``history`` and ``selected``). One panel
    per metric of :data:`CURVE_METRICS`, one line per run in its model's colour
    (:func:`saferclip.evaluation.plotting.model_styles`; ``models``: every model of the report,
    so that other models keep their colours), the exported epoch circled.
    Returns the file, or None when no run has a history."""
    records = {n: r for n, r in records.items() if r and r.get("history")}
    if not records:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = figure(4.0 * len(CURVE_METRICS), 3.3)
    palette = model_colours([*(models or []), *records])
    for col, (key, label) in enumerate(CURVE_METRICS):
        ax = fig.add_subplot(1, len(CURVE_METRICS), col + 1)
        for i, (name, record) in enumerate(records.items()):
            colour = palette[name]
            history = sorted(record["history"], key=lambda h: h["epoch"])
            points = [(h["epoch"], 100 * h["metrics"][key]) for h in history if key in h["metrics"]]
            if not points:
                continue
            # each run thinner than the one before: runs whose curves coincide all show
            ax.plot(
                *zip(*points),
                marker=".",
                color=colour,
                label=name,
                linewidth=overlap_width(i, len(records)),
                zorder=2 + i,
            )
            selected = (record.get("selected") or {}).get("epoch")
            chosen = [p for p in points if p[0] == selected]
            if chosen:
                ax.scatter(*zip(*chosen), s=110, facecolors="none", edgecolors=colour, linewidths=1.8, zorder=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(f"{label} (%)", fontsize=8)
        ax.set_title(f"validation {label}", fontsize=9)
        ax.set_ylim(-2, 102)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7, title=f"{EXPORTED_MARK} exported epoch", title_fontsize=7)
    path = Path(path)
    save_figure(fig, path)
    return path


def tradeoff_points(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{name, unsafe_a, retention, u2v}]`` (fractions; NaN where not measured) of every model
    of an evaluation with an unsafe rate (a) (:func:`saferclip.evaluation.headline.headline`)."""
    from .headline import headline

    points = []
    for name, model_results in (results.get("results") or {}).items():
        h = headline(model_results)
        if "unsafe_rate_a" in h and ("zeroshot_retention" in h or "U2V_R@1" in h):
            points.append(
                {
                    "name": name,
                    "unsafe_a": h["unsafe_rate_a"],
                    "retention": h.get("zeroshot_retention", math.nan),
                    "u2v": h.get("U2V_R@1", math.nan),
                }
            )
    return points


_SWEEP = re.compile(r"^(?P<base>.+)_p(?P<percentile>\d+(\.\d+)?)$")


def sweep_curves(points: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """The traversal sweeps among ``points`` (HySAC evaluated at several safe radii: names
    ``<base>_p<percentile>``): per base, ``(unsafe rate (a), key)`` in % averaged over the
    points of each percentile (seeds), in percentile order."""
    groups: dict[str, dict[float, list[Mapping[str, Any]]]] = {}
    for p in points:
        match = _SWEEP.match(str(p["name"]))
        if match and math.isfinite(p.get(key, math.nan)):
            groups.setdefault(match["base"], {}).setdefault(float(match["percentile"]), []).append(p)
    curves = {}
    for base, by_percentile in groups.items():
        if len(by_percentile) < 2:
            continue
        curves[base] = [
            (100 * sum(p["unsafe_a"] for p in ps) / len(ps), 100 * sum(p[key] for p in ps) / len(ps))
            for _, ps in sorted(by_percentile.items())
        ]
    return curves


DODGE = 2.0  # percentage points: closer points are drawn side by side, ...
DODGE_STEP = 3.0  # ... this far apart (a marker's width on the 0-100 scale)


def side_by_side(
    points: Sequence[tuple[str, float, float]], within: float = DODGE, step: float = DODGE_STEP
) -> list[tuple[str, float, float]]:
    """``(name, x, y)`` points with those closer than ``within`` (on both axes) to a group's first
    point spread along x, ``step`` apart around it, so that none hides another (y kept)."""
    groups: list[list[int]] = []
    for i, (_, x, y) in enumerate(points):
        for group in groups:
            _, x0, y0 = points[group[0]]
            if abs(x - x0) < within and abs(y - y0) < within:
                group.append(i)
                break
        else:
            groups.append([i])
    out = list(points)
    for group in groups:
        centre = points[group[0]][1]
        for j, i in enumerate(group):
            name, _, y = points[i]
            out[i] = (name, centre + (j - (len(group) - 1) / 2) * step, y)
    return out


def plot_tradeoff(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    original: str = "original",
    title: str = "",
    models: Sequence[str] | None = None,
) -> Path | None:
    """Two panels, one point per entry of ``points`` (``name``, ``unsafe_a``, ``retention``,
    ``u2v``; several entries may share a name, e.g. seeds): unsafe rate (a) against
    zero-shot retention, and against U→V R@1, both on the whole percentage scale. Every model in
    its colour (:func:`saferclip.evaluation.plotting.model_styles`), the ``original`` model a
    black star; points closer than :data:`DODGE` are set side by side (:func:`side_by_side`)."""
    points = [p for p in points if math.isfinite(p.get("unsafe_a", math.nan))]
    if not points:
        return None
    names = list(dict.fromkeys(p["name"] for p in points))
    styles = model_styles([*(models or []), *names], reference=original)
    fig = figure(9.0, 3.6)
    moved = False
    for col, (key, label) in enumerate((("retention", "zero-shot retention (%)"), ("u2v", "U→V R@1 (%)"))):
        ax = fig.add_subplot(1, 2, col + 1)
        own = [(p["name"], 100 * p["unsafe_a"], 100 * p[key]) for name in names for p in points
               if p["name"] == name and math.isfinite(p.get(key, math.nan))]  # fmt: skip
        shown = [y for _, _, y in own]
        placed = side_by_side(own)
        moved |= any(abs(x - p[1]) > 1e-9 for p, (_, x, _) in zip(own, placed))
        for name in names:
            xs, ys = [x for n, x, _ in placed if n == name], [y for n, _, y in placed if n == name]
            if not xs:
                continue
            if styles[name]["original"]:
                ax.scatter(xs, ys, marker="*", s=150, color=styles[name]["color"], label=name, zorder=4)
            else:
                ax.scatter(xs, ys, s=40, color=styles[name]["color"], label=name, zorder=3)
        for base, curve in sweep_curves(points, key).items():
            colour = styles.get(f"{base}_safe", styles.get(base, {})).get("color", "grey")
            ax.plot(
                *zip(*curve), linestyle="--", linewidth=1, color=colour, label=f"{base}: safe radius swept", zorder=1
            )
        ax.set_xlabel("unsafe rate (a) (%) — lower is safer", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlim(-3, 103)
        # the whole percentage scale, not the few points the values span: a gap of 1 point
        # must look like one (retention may pass 100)
        ax.set_ylim(min([-3.0, *(y - 3 for y in shown)]), max([103.0, *(y + 3 for y in shown)]))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if col == 1:
            ax.legend(fontsize=6, loc="best")
    note = f"\npoints closer than {DODGE:g} percentage points are drawn side by side" if moved else ""
    fig.suptitle((title or "safety against what it costs (every model a point)") + note, fontsize=9)
    path = Path(path)
    save_figure(fig, path)
    return path

"""What every report's plots share: a figure on matplotlib's Agg canvas (no pyplot, no global
backend), an atomic PNG write, a colour per model, and JSON without NaN."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_path


def figure(width: float = 6.0, height: float = 3.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------- the palette
# Every colour the reports use, defined here once. Two mean a kind of item, never a model: red
# for unsafe items, green for safe ones (the query's safe twin in the galleries, safe points in
# the geometry plots). Models take the other colours, the original model black (with a star).
UNSAFE_COLOUR = "#d62728"  # red
SAFE_COLOUR = "#2ca02c"  # green
ORIGINAL_COLOUR = "#000000"
# the models every report shows, in this order, always in these colours (keys: the name
# lower-cased without punctuation, so "saferclip" and "SafeR-CLIP" are the same model)
KNOWN_MODELS = {
    "safeclip": "#1f77b4",  # blue
    "saferclip": "#ff7f0e",  # orange
    "hysac": "#17becf",  # cyan: the trained HySAC run (its curves) ...
    "hysacsafe": "#17becf",  # ... is the same model as HySAC in safe mode
    "hysacmoderation": "#9467bd",  # purple
    "oracleredirection": "#7f7f7f",  # grey: a bound, not a model
}
# any other model: the rest of tab10, then tab20's lighter shades, in the order first seen
# (none of them red or green: those mean unsafe and safe)
OTHER_COLOURS = (
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#aec7e8",
    "#ffbb78",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
    "#393b79",
    "#843c39",
    "#7b4173",
    "#637939",
)
MARK_COLOURS = (UNSAFE_COLOUR, SAFE_COLOUR)
MARKS = {"unsafe": UNSAFE_COLOUR, "safe": SAFE_COLOUR}  # what report.html's galleries frame with
# One symbol per meaning, in every report: the original model; in the galleries, the query's own
# (paired) unsafe counterpart; in the training curves, the exported epoch.
ORIGINAL_MARK = "★"
OWN_MARK = "◆"
EXPORTED_MARK = "○"
ORIGINAL_NAMES = ("original", "originalclip", "reference", "base")


def _model_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def is_original(name: str, reference: str | None = None) -> bool:
    """The original (reference) model: ``reference`` when given, else a name like "original"."""
    return (reference is not None and name == reference) or _model_key(name) in ORIGINAL_NAMES


def model_styles(names, reference: str | None = None) -> dict[str, dict[str, Any]]:
    """The one style of each model, the same in every plot of every report: ``{name:
    {"color", "marker", "original"}}``. The original model is a black star; Safe-CLIP,
    SafeR-CLIP, HySAC (safe) and HySAC (moderation) (any spelling: ``saferclip`` ==
    ``SafeR-CLIP``) always get their fixed colours; any other model the next free colour of a
    palette, in the order of ``names``. No model is red or green (:data:`MARK_COLOURS`). Pass every model of the report (the order of
    ``names`` decides the colours of unknown models, so give them in one stable order)."""
    styles: dict[str, dict[str, Any]] = {}
    others = iter(OTHER_COLOURS)
    for name in dict.fromkeys(names):
        if is_original(name, reference):
            styles[name] = {"color": ORIGINAL_COLOUR, "marker": "*", "original": True}
            continue
        colour = KNOWN_MODELS.get(_model_key(name))
        if colour is None:
            colour = next(others, None) or OTHER_COLOURS[len(styles) % len(OTHER_COLOURS)]
        styles[name] = {"color": colour, "marker": "o", "original": False}
    return styles


def overlap_width(i: int, n: int, thinnest: float = 1.2, step: float = 1.1) -> float:
    """The line width of the ``i``-th of ``n`` lines drawn in order: each thinner than the one
    before, so that lines which coincide still show every colour (the first outermost)."""
    return thinnest + step * (n - 1 - i)


def model_colours(names, reference: str | None = None) -> dict[str, Any]:
    """``{name: colour}`` of :func:`model_styles`."""
    return {name: style["color"] for name, style in model_styles(names, reference).items()}


def finite(obj: Any) -> Any:
    """NaN / inf -> None, recursively, so the JSON is strict (other tools reject NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj

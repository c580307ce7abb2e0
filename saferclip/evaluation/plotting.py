"""What every report's plots share: a figure on matplotlib's Agg canvas (no pyplot, no global
backend), an atomic PNG write, a colour per model, and JSON without NaN."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

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


def colours(n: int) -> list:
    """``n`` distinct colours (tab10, tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- one style per model
ORIGINAL_COLOUR = "#000000"
# the models every report shows, in this order, always in these colours (keys: the name
# lower-cased without punctuation, so "saferclip" and "SafeR-CLIP" are the same model)
KNOWN_MODELS = {
    "safeclip": "#1f77b4",  # blue
    "saferclip": "#ff7f0e",  # orange
    "hysacsafe": "#2ca02c",  # green
    "hysacmoderation": "#9467bd",  # purple
    "oracleredirection": "#7f7f7f",  # grey: a bound, not a model
}
# any other model: the rest of tab10, then tab20's lighter shades, in the order first seen
OTHER_COLOURS = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                 "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
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
    palette, in the order of ``names``. Pass every model of the report (the order of
    ``names`` decides the colours of unknown models, so give them in one stable order)."""
    styles: dict[str, dict[str, Any]] = {}
    others = iter(OTHER_COLOURS)
    for name in dict.fromkeys(names):
        if is_original(name, reference):
            styles[name] = {"color": ORIGINAL_COLOUR, "marker": "*", "original": True}
            continue
        colour = KNOWN_MODELS.get(_model_key(name))
        if colour is None:
            colour = next(others, None) or colours(20)[len(styles) % 20]
        styles[name] = {"color": colour, "marker": "o", "original": False}
    return styles


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

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


def finite(obj: Any) -> Any:
    """NaN / inf -> None, recursively, so the JSON is strict (other tools reject NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj

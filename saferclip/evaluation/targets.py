"""How a figure reads against its target, in every document that judges one (the main job's
targets, the misalignment study's over seeds, the robustness page's): ``met: 0.6 [0.1, 1.7] ≤ 5``
or ``missed: 77.4 [73.8, 81.0] against ≥ 80 (2.6 points short)``."""

from __future__ import annotations

SIGNS = {"at-least": "≥", "at-most": "≤"}


def verdict(
    shown: str,
    value: float,
    op: str,
    bound: float,
    *,
    bound_text: str | None = None,
    digits: int = 1,
    unit: str | None = "point",
) -> str:
    """``shown`` (the figure as the document prints it) against ``op`` (``at-least`` or
    ``at-most``) ``bound``. ``value`` is judged as printed, rounded to ``digits``, so that a
    figure shown as 10.0 never reads "missed" against ≤ 10. ``bound_text`` writes the bound
    (default ``f"{bound:g}"``); a missed target says by how many ``unit``\\ s (None: it does not)."""
    if op not in SIGNS:
        raise ValueError(f"op must be one of {', '.join(SIGNS)}, got {op!r}")
    sign, written = SIGNS[op], bound_text if bound_text is not None else f"{bound:g}"
    value = round(value, digits)
    if value >= bound if op == "at-least" else value <= bound:
        return f"met: {shown} {sign} {written}"
    missed = f"missed: {shown} against {sign} {written}"
    if unit is None:
        return missed
    gap = round(abs(value - bound), digits)
    plural = "" if digits == 0 and gap == 1 else "s"
    return f"{missed} ({gap:.{digits}f} {unit}{plural} {'short' if op == 'at-least' else 'over'})"


__all__ = ["SIGNS", "verdict"]

"""The ε sweep in the robustness docs (``scripts/robustness_sweep.py``'s results, kept in
``docs/results/robustness.json`` under ``sweep``): its table (``robustness-sweep``), its curve
over the training budget (the picture ``robustness-sweep-plot``), and the budget it chooses for
a method by that method's own attack targets (:func:`choose_epsilon`: the rule
``scripts/robustness_experiments.sh`` applies, quoted by ``robustness-choice method=``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import SummaryError
from .report import pct

SWEEP_ATTACKS = ("evade", "gallery (unsafe query)", "phrasing search", "held-out phrasings")


def _sweep_rate(point: Mapping[str, Any], attack: str) -> Mapping[str, Any] | None:
    """The rate the sweep table shows for ``attack`` at one ε: at 8/255 for an image attack, at
    the largest query budget measured for a text one."""
    budgets = point["attacks"].get(attack) or {}
    return budgets.get("8") or (budgets[list(budgets)[-1]] if budgets else None)


def sweep_table(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    sweep = results.get("sweep")
    if not sweep:
        return "Not measured yet (the result file has no sweep: scripts/robustness_sweep.py)."
    rows = [
        "| method | ε (/255) | epoch | unsafe (a) | U→V R@1 | S→V R@1 | zero-shot retention | "
        + " | ".join(SWEEP_ATTACKS)
        + " | step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(SWEEP_ATTACKS) + "---:|",
    ]
    for method, points in sweep["methods"].items():
        for p in points:
            v = p["validation"]
            cell = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
            attacks = [pct(_sweep_rate(p, a)) for a in SWEEP_ATTACKS]
            step = "–" if p.get("step_seconds") is None else f"{p['step_seconds']:.2f}"
            rows.append(
                f"| {method} | {p['epsilon_255']:g} | {p.get('epoch')} | {cell(v.get('U2VG_unsafe@1'))} | {cell(v.get('U2V_R@1'))} | "
                f"{cell(v.get('S2V_R@1'))} | {cell(p.get('zeroshot_retention'))} | "
                + " | ".join(attacks)
                + f" | {step} |"
            )
    return "\n".join(rows)


# The attack targets a swept method's training budget is chosen by, on the tuning world's
# validation split: (attack, budget key in the sweep, highest success rate that meets it).
SWEEP_TARGETS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "saferclip": (("evade", "8", 0.10), ("phrasing search", "60", 0.20)),
    "hysac": (
        ("gallery (unsafe query)", "8", 0.10),
        ("gallery (safe query)", "8", 0.10),
        ("gallery (any query)", "8", 0.10),
    ),
}


def choose_epsilon(sweep: Mapping[str, Any], method: str) -> tuple[float, bool]:
    """The training budget ε (/255) the sweep chooses for ``method``: the smallest swept ε > 0
    whose run meets every one of the method's :data:`SWEEP_TARGETS` (``True``), else the one
    whose first target's attack succeeds least (``False``). A rate that was not measured meets
    nothing; a rate of 0 meets every bound."""
    if method not in SWEEP_TARGETS:
        raise SummaryError(f"no sweep targets for {method!r}; expected one of {', '.join(SWEEP_TARGETS)}")
    points = [p for p in ((sweep.get("methods") or {}).get(method) or []) if p["epsilon_255"] > 0]
    if not points:
        raise SummaryError(f"the sweep has no run of {method!r} with ε > 0")

    def rate(point: Mapping[str, Any], attack: str, budget: str) -> float:
        value = ((point["attacks"].get(attack) or {}).get(budget) or {}).get("value")
        return math.inf if value is None else float(value)

    targets = SWEEP_TARGETS[method]
    meets = [p for p in points if all(rate(p, a, b) <= bound for a, b, bound in targets)]
    if meets:
        return float(min(meets, key=lambda p: p["epsilon_255"])["epsilon_255"]), True
    first, budget, _ = targets[0]
    return float(min(points, key=lambda p: (rate(p, first, budget), p["epsilon_255"]))["epsilon_255"]), False


def choice(results: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """``method=``: the budget the sweep chooses for it by its own targets, and why:
    ``2/255 (the smallest swept budget meeting its attack targets on validation)``."""
    sweep = results.get("sweep")
    if not sweep:
        raise SummaryError("robustness-choice: the result file has no sweep")
    epsilon, met = choose_epsilon(sweep, args.get("method", ""))
    why = (
        "the smallest swept budget meeting its attack targets on validation"
        if met
        else "no swept budget met its attack targets on validation; the one its first attack succeeds least against"
    )
    return f"{epsilon:g}/255 ({why})"


SWEEP_CLEAN = (("U2V_R@1", "U→V R@1"), ("S2V_R@1", "S→V R@1"), ("zeroshot_retention", "zero-shot retention"))
SWEEP_CAPTION = (
    "Robustness against clean retrieval over the adversarial training budget ε (world 0, validation split): "
    "attack success solid with its exact 95% interval shaded, clean figures dashed, the chosen ε dotted"
)


def draw_sweep(results: Mapping[str, Any], path: Path) -> None:
    """docs/img/robustness_sweep.png: one panel per swept method, x the training budget ε; the
    success of each attack of the sweep table (solid, its interval shaded) and the clean
    validation figures (dashed) that robustness trades against."""
    from ..evaluation.plotting import OTHER_COLOURS, figure, save_figure

    sweep = results.get("sweep") or {}
    methods = {m: pts for m, pts in (sweep.get("methods") or {}).items() if pts}
    if not methods:
        raise SummaryError("the result file has no sweep to draw (scripts/robustness_sweep.py)")
    chosen = (results.get("commands") or {}).get("epsilon")
    fig = figure(5.2 * len(methods), 3.9)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    colours = dict(zip(SWEEP_ATTACKS, OTHER_COLOURS))
    # dark colours for the clean figures: no model's colour, and neither red nor green
    clean_colours = dict(zip((k for k, _ in SWEEP_CLEAN), ("#393b79", "#7b4173", "#000000")))
    for ax, (method, points) in zip(axes, methods.items()):
        points = sorted(points, key=lambda p: p["epsilon_255"])
        eps = [p["epsilon_255"] for p in points]
        for attack in SWEEP_ATTACKS:
            rates = [_sweep_rate(p, attack) for p in points]
            if not any(r and r.get("value") is not None for r in rates):
                continue
            xs = [e for e, r in zip(eps, rates) if r and r.get("value") is not None]
            kept = [r for r in rates if r and r.get("value") is not None]
            ax.plot(xs, [100 * r["value"] for r in kept], "o-", color=colours[attack], label=attack)
            if all(r.get("low") is not None for r in kept):
                ax.fill_between(
                    xs,
                    [100 * r["low"] for r in kept],
                    [100 * r["high"] for r in kept],
                    color=colours[attack],
                    alpha=0.12,
                )
        for key, label in SWEEP_CLEAN:
            values = [
                (p.get(key) if key == "zeroshot_retention" else (p.get("validation") or {}).get(key)) for p in points
            ]
            kept = [(e, v) for e, v in zip(eps, values) if isinstance(v, (int, float))]
            if kept:
                ax.plot(
                    [e for e, _ in kept],
                    [100 * v for _, v in kept],
                    "s--",
                    color=clean_colours[key],
                    label=f"clean {label}",
                )
        if chosen is not None:
            ax.axvline(float(chosen), color="#7f7f7f", linestyle=":", linewidth=1.2, label=f"chosen ε = {chosen}/255")
        ax.set_title(method)
        ax.set_xlabel("adversarial training budget ε (/255)")
        ax.set_xticks(eps)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, Path(path))


__all__ = ["SWEEP_CAPTION", "SWEEP_TARGETS", "choice", "choose_epsilon", "draw_sweep", "sweep_table"]

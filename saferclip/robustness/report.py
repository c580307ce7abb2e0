"""``saferclip-attack``'s report: ``attack.json``, ``attack.md`` (the tables, exact 95%
intervals over the attacked items) and ``plots/success_vs_budget.png`` (image-attack success
rate against the L∞ budget, one line per model and goal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..evaluation.plotting import figure, finite, model_styles, save_figure
from ..files import atomic_path


def _pct(rate: Mapping[str, Any] | None) -> str:
    if not rate or rate.get("value") is None:
        return "n/a"
    return f"{100 * rate['value']:.1f} [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def image_table(results: Mapping[str, Any]) -> str:
    rows = ["| model | goal | budget | attacked (top-1 safe before) | success rate | unsafe rate before | unsafe rate after |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in results["models"].items():
        for r in (m.get("image") or {}).values():
            rows.append(f"| {name} | {r['goal']} | {r['budget_255']:g}/255 | {r['num_targets']} of {r['num_items']} | "
                        f"{_pct(r['success_rate'])} | {_pct(r['unsafe_rate_before'])} | {_pct(r['unsafe_rate_after'])} |")
    return "\n".join(rows)


def text_table(results: Mapping[str, Any]) -> str:
    rows = ["| model | attacked (top-1 safe before) | success rate | unsafe rate before | unsafe rate after | median queries (successes) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, m in results["models"].items():
        r = m.get("text")
        if r:
            median = "n/a" if r["median_queries"] is None else f"{r['median_queries']:g}"
            rows.append(f"| {name} | {r['num_targets']} of {r['num_items']} | {_pct(r['success_rate'])} | "
                        f"{_pct(r['unsafe_rate_before'])} | {_pct(r['unsafe_rate_after'])} | {median} |")
    return "\n".join(rows)


def monitor_table(results: Mapping[str, Any]) -> str:
    rows = ["| model | tower | input | n | flagged |", "|---|---|---|---:|---:|"]
    for name, m in results["models"].items():
        for tower in ("image", "text"):
            r = (m.get("monitor") or {}).get(tower)
            if not r:
                continue
            for key, rate in r.items():
                if isinstance(rate, Mapping):
                    n = rate.get("n", "")
                    rows.append(f"| {name} | {tower} | {key} | {n} | {_pct(rate)} |")
    return "\n".join(rows)


def summary_table(results: Mapping[str, Any]) -> str:
    """Every table, in Markdown (the console output and ``attack.md``)."""
    parts = []
    if any(m.get("image") for m in results["models"].values()):
        parts += ["Image attacks (PGD, L∞; success = top-1 caption unsafe after the attack, over the items whose top-1 was safe before; exact 95% intervals):", "", image_table(results), ""]
    if any(m.get("text") for m in results["models"].values()):
        parts += ["Text attacks (phrasing search):", "", text_table(results), ""]
    if any(m.get("monitor") for m in results["models"].values()):
        parts += ["Coverage monitor (share flagged; clean_test = false positives):", "", monitor_table(results), ""]
    return "\n".join(parts)


def success_plot(results: Mapping[str, Any], path: Path) -> Path | None:
    names = list(results["models"])
    styles = model_styles(names)
    fig = figure(6.5, 3.8)
    ax = fig.add_subplot()
    drawn = False
    for name in names:
        per_goal: dict[str, list[tuple[float, float]]] = {}
        for r in (results["models"][name].get("image") or {}).values():
            if r["success_rate"]["value"] is not None:
                per_goal.setdefault(r["goal"], []).append((r["budget_255"], 100 * r["success_rate"]["value"]))
        for goal, points in per_goal.items():
            points.sort()
            ax.plot([0] + [p[0] for p in points], [0] + [p[1] for p in points], marker=styles[name]["marker"],
                    color=styles[name]["color"], linestyle="-" if goal == "evade" else "--", label=f"{name} ({goal})")
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("L∞ budget (grey levels of 255)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)
    return path


def write_attack_report(results: Mapping[str, Any], out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "attack.json", out_dir / "attack.md"
    if json_path.exists() and not force:
        raise FileExistsError(f"{json_path} exists; pass force=true or another out_dir")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(finite(results), indent=1, default=str) + "\n", encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text("# Safety under attack\n\n" + summary_table(results) + "\n", encoding="utf-8")
    plot = success_plot(results, out_dir / "plots" / "success_vs_budget.png")
    return {"json": json_path, "markdown": md_path, "plots": [plot] if plot else []}

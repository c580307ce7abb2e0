"""``saferclip-attack``'s report: ``attack.json`` (everything), ``attack.md`` (the tables),
``report.html`` (the same, one self-contained page) and ``plots/success_vs_budget_<attack>.png``.

Tables (all numbers in %, each success rate over the items the clean model handled safely,
with its exact 95% interval):

* summary — every attack at the headline budget (image attacks: ``headline_budget_255``; text
  attacks: their query budget), one column per model;
* the sweep — every attack × budget × model, with the sanity column: ``ok`` where the largest
  budget reaches the threshold, else the reason (the embedding-space bound);
* the safety monitor — false positives on clean safe test inputs, flags on clean unsafe ones,
  detection of the successful attacks at the headline budget (oblivious, pooled over attacks)
  and the attacks that know it (adaptive: success through model and monitor, and the share of
  unsafe finds still flagged);
* the coverage monitor (the baseline) on the same successes;
* HySAC's geometry (safe radii, how far out safe and unsafe items lie).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation.intervals import clopper_pearson
from ..evaluation.plotting import figure, finite, model_styles, save_figure
from ..files import atomic_path, write_text_atomic


def pct(rate: Mapping[str, Any] | None, counts: bool = False) -> str:
    """``value [low, high]`` in %, optionally with ``k/n``; ``n/a`` when nothing was measured."""
    if not rate or rate.get("value") is None:
        return "n/a"
    text = f"{100 * rate['value']:.1f} [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"
    return text + (f" ({rate['k']}/{rate['n']})" if counts else "")


def headline_key(result: Mapping[str, Any], headline_255: float) -> str:
    """The budget a row of the summary reads: the headline grey level, or a text attack's query budget."""
    return str(result["query_budget"]) if result.get("kind") == "text" else f"{headline_255:g}"


def attack_names(results: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for m in results["models"].values():
        names += [a for a in (m.get("attacks") or {}) if a not in names]
    return names


def summary_table(results: Mapping[str, Any]) -> str:
    models = list(results["models"])
    headline = float(results["settings"]["headline_budget_255"])
    rows = ["| attack | budget | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
    for attack in attack_names(results):
        cells, budget = [], ""
        for name in models:
            r = (results["models"][name].get("attacks") or {}).get(attack)
            if r is None:
                cells.append("–")
                continue
            key = headline_key(r, headline)
            budget = f"{key} queries" if r["kind"] == "text" else f"{key}/255"
            row = r["budgets"].get(key, {})
            cells.append(f"{pct(row.get('success_rate'))} of {r['num_targets']}")
        rows.append(f"| {attack} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_table(results: Mapping[str, Any]) -> str:
    rows = [
        "| model | attack | budget | success rate | unsafe before | unsafe after | monitor detected | sanity |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in results["models"].items():
        for attack, r in (m.get("attacks") or {}).items():
            unit = " queries" if r["kind"] == "text" else "/255"
            budgets = list(r["budgets"])
            for b in budgets:
                row = r["budgets"][b]
                sanity = _sanity_text(r.get("sanity") or {}) if b == budgets[-1] else ""
                rows.append(
                    f"| {name} | {attack} | {b}{unit} | {pct(row.get('success_rate'))} | {pct(row.get('unsafe_rate_before'))} | "
                    f"{pct(row.get('unsafe_rate_after'))} | {pct(row.get('monitor_detected'))} | {sanity} |"
                )
    return "\n".join(rows)


def _sanity_text(sanity: Mapping[str, Any]) -> str:
    reason = sanity.get("reason", "")
    return reason.replace("|", "/")


def pooled(results_model: Mapping[str, Any], headline_255: float, joint: bool, key: str) -> dict[str, Any]:
    """A rate pooled over the model's attacks at their headline budgets (sums of k and n)."""
    k = n = 0
    for r in (results_model.get("attacks") or {}).values():
        if bool(r.get("monitor_joint")) != joint:
            continue
        rate = r["budgets"].get(headline_key(r, headline_255), {}).get(key)
        if rate and rate.get("n"):
            k, n = k + rate["k"], n + rate["n"]
    if n == 0:
        return {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    low, high = clopper_pearson(k, n)
    return {"value": k / n, "low": low, "high": high, "k": k, "n": n}


def monitor_table(results: Mapping[str, Any]) -> str:
    headline = float(results["settings"]["headline_budget_255"])
    rows = [
        "| model | signals (head) | clean safe flagged (image / text) | clean unsafe flagged (image / text) | "
        "successful attacks detected (oblivious) | success against model + monitor (adaptive) | unsafe finds still flagged (adaptive) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        mon = m.get("monitor")
        if not mon:
            continue
        image, text = mon.get("image", {}), mon.get("text", {})
        head = ", ".join(f"{t} L{v['head'][0]}H{v['head'][1]}" for t, v in mon.items() if v.get("head"))
        rows.append(
            f"| {name} | {', '.join(image.get('signals', []))} ({head or 'none'}) | {pct(image.get('clean_safe_flagged'))} / "
            f"{pct(text.get('clean_safe_flagged'))} | {pct(image.get('clean_unsafe_flagged'))} / {pct(text.get('clean_unsafe_flagged'))} | "
            f"{pct(pooled(m, headline, False, 'monitor_detected'), True)} | {pct(pooled(m, headline, True, 'success_rate'), True)} | "
            f"{pct(pooled(m, headline, True, 'monitor_detected'), True)} |"
        )
    return "\n".join(rows)


def coverage_table(results: Mapping[str, Any]) -> str:
    rows = ["| model | tower | input | flagged |", "|---|---|---|---:|"]
    for name, m in results["models"].items():
        for tower in ("image", "text"):
            r = (m.get("coverage") or {}).get(tower)
            for key, rate in (r or {}).items():
                if isinstance(rate, Mapping):
                    rows.append(f"| {name} | {tower} | {key} | {pct(rate, True)} |")
    return "\n".join(rows)


def geometry_table(results: Mapping[str, Any]) -> str:
    keys = (
        "radius_text",
        "safe_captions_max",
        "unsafe_captions_min",
        "radius_image",
        "safe_images_max",
        "unsafe_images_min",
    )
    rows = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in results["models"].items():
        g = m.get("geometry")
        if g:
            rows.append(f"| {name} | " + " | ".join(f"{g[k]:.3f}" for k in keys) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def markdown(results: Mapping[str, Any]) -> str:
    headline = float(results["settings"]["headline_budget_255"])
    parts = [
        f"Split `{results['split']}` of world {results.get('world')}, seed {results['seed']}; every success rate is over the items "
        "the clean model handled safely (their number after 'of'), in %, with its exact (Clopper–Pearson) 95% interval.",
        "",
        f"## Summary (image attacks at {headline:g}/255, text attacks at their query budget)",
        "",
        summary_table(results),
        "",
    ]
    if any(m.get("monitor") for m in results["models"].values()):
        parts += [
            "## Safety monitor (5% false-positive target on clean safe validation inputs)",
            "",
            "Pooled over every attack at its headline budget; k/n after each rate.",
            "",
            monitor_table(results),
            "",
        ]
    geometry = geometry_table(results)
    if geometry:
        parts += ["## HySAC's geometry (distances from the origin)", "", geometry, ""]
    parts += [
        "## Every attack × budget, with the sanity column",
        "",
        "Sanity: `ok` where the largest budget reaches the threshold; otherwise why it does not (the same goal "
        "searched over free embeddings, with no input).",
        "",
        sweep_table(results),
        "",
    ]
    if any(m.get("coverage") for m in results["models"].values()):
        parts += ["## Coverage monitor (the baseline)", "", coverage_table(results), ""]
    return "\n".join(parts)


def success_plots(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """One plot per image attack: success rate against the L∞ budget, one line per model."""
    names = list(results["models"])
    styles = model_styles(names)
    paths = []
    for attack in attack_names(results):
        fig = figure(6.5, 3.6)
        ax = fig.add_subplot()
        drawn = False
        for name in names:
            r = (results["models"][name].get("attacks") or {}).get(attack)
            if not r or r["kind"] != "image":
                continue
            points = [
                (float(b), 100 * row["success_rate"]["value"])
                for b, row in r["budgets"].items()
                if row["success_rate"]["value"] is not None
            ]
            if points:
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker=styles[name]["marker"],
                    color=styles[name]["color"],
                    label=name,
                )
                drawn = True
        if not drawn:
            continue
        ax.set_xscale("log", base=2)
        ticks = sorted(
            {
                float(b)
                for m in names
                for b in ((results["models"][m].get("attacks") or {}).get(attack) or {}).get("budgets", {})
            }
        )
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("L∞ budget (grey levels of 255)")
        ax.set_ylabel("success rate (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(attack)
        ax.legend(fontsize=7, loc="best")
        slug = "".join(ch if ch.isalnum() else "_" for ch in attack).strip("_")
        path = folder / f"success_vs_budget_{slug}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def write_attack_report(results: Mapping[str, Any], out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    from ..evaluation.html import Page, table_from_markdown, write_html_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "attack.json", out_dir / "attack.md"
    if json_path.exists() and not force:
        raise FileExistsError(f"{json_path} exists; pass force=true or another out_dir")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(finite(results), indent=1, default=str) + "\n", encoding="utf-8")
    text = markdown(results)
    write_text_atomic(md_path, "# Safety under attack\n\n" + text + "\n")
    plots = success_plots(results, out_dir / "plots")
    headline = float(results["settings"]["headline_budget_255"])
    page = Page(
        title="saferclip: safety under attack",
        subtitle=f"split {results['split']}, world {results.get('world')}, seed {results['seed']}",
        headline=table_from_markdown(
            summary_table(results),
            f"Attack success (%; image attacks at {headline:g}/255)",
            "Over the items the clean model handled safely; exact 95% intervals; 'of n': the targets.",
        ),
        plots=plots,
        markdown=text,
        models=list(results["models"]),
    )
    html_path = write_html_report(page, out_dir)
    return {"json": json_path, "markdown": md_path, "html": html_path, "plots": plots}

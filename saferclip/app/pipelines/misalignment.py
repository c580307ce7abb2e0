"""The misalignment study (``saferclip-study misalignment.enabled=true``): how far apart may a
training pair's safe and unsafe halves be before redirecting to the nearest safe item beats
redirecting to the item's own pair, and what does HySAC do there?

The toy world's pairing knob (``data.toy_pairs``, docs/METHOD.md, "How a pair is made") sets
how a safe / unsafe pair is made, from a minimal edit to a random item of the same shape. For
each level in ``misalignment.pairings`` and each seed s, the study's methods train and test on
world s + ``world_offset`` made with that pairing (a world never used while tuning), with the
study's experiment configs unchanged: the settings tuned on the default pairing, so a method
whose setting suits only that pairing shows it. Every run keeps its checkpoint at matched
safety (``selection.tau``: the best validation U→V among the epochs at most τ unsafe, else the
safest epoch), and the study records, per level, seed and method, whether τ was reached.

Each level is summarised by its own-pair cosine with the shipped base model (the training pairs'
median, :mod:`saferclip.toyworld.pair_stats`), the x axis of ``plots/misalignment.png``: per
method, the test split's U→V R@1, zero-shot retention, NSFW-Caps S→V R@1 and unsafe rate (a),
mean ± std over seeds, a hollow marker where some seed never reached τ.

Outputs under ``misalignment.out_dir``: ``misalignment.json`` (every figure, the pair statistics,
the runs), ``misalignment.md`` (the table and the plot) and ``per_level/<pairing>/seed<s>.json``
(each evaluation in full). Runs are shared with ``saferclip-main`` and the study (same run
keys), so the default pairing's runs are trained once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...errors import ConfigError
from ...evaluation.headline import headline
from ...model.trained import read_selection
from ..hydra_utils import to_container
from .runs import check_runs, compose, evaluated_models, train_or_reuse

log = logging.getLogger("saferclip.study")

# (headline key, label) of the plot's panels and the table's columns
PANELS: tuple[tuple[str, str], ...] = (
    ("U2V_R@1", "U→V R@1 (%)"),
    ("zeroshot_retention", "zero-shot retention (%)"),
    ("nsfw_caps_S2V_R@1", "NSFW-Caps S→V R@1 (%)"),
    ("unsafe_rate_a", "unsafe rate (a) (%) ↓"),
)
# the model whose figures stand for a method: HySAC by its safe mode (its moderation mode is
# meant to find unsafe content: its row is in the table, not on the plot)
HYSAC_MODERATION_SUFFIX = "_moderation"


def check_pairings(value: Any) -> list[str]:
    """``misalignment.pairings``: two or more distinct pairing presets (refused in one line,
    before any run trains)."""
    from omegaconf import ListConfig

    from ...toyworld.pairing import PAIRINGS

    if isinstance(value, ListConfig):
        value = to_container(value)
    if not isinstance(value, list) or len(value) < 2:
        raise ConfigError(
            f"misalignment.pairings must list two or more pairings of {sorted(PAIRINGS)}, e.g. "
            f"[minimal,visu,drifted,loose]; got {value!r}"
        )
    unknown = [p for p in value if p not in PAIRINGS]
    if unknown:
        raise ConfigError(f"misalignment.pairings: {unknown} are not pairings; expected some of {sorted(PAIRINGS)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"misalignment.pairings={value}: a pairing appears twice")
    return list(value)


def own_pair_cosine(stats: Mapping[str, Any]) -> dict[str, float]:
    """The median own-pair cosine of a world's training pairs, per modality."""
    return {m: float(stats[m]["own_cosine"]["median"]) for m in ("text", "image")}


def matched_record(run_dir: str | Path | None) -> dict[str, Any] | None:
    """What matched safety kept for a run (``selection.json``'s ``matched_safety``), if recorded."""
    record = read_selection(run_dir) if run_dir else None
    return (record or {}).get("matched_safety")


def summarise(levels: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pairing: {model: {key: {"mean", "std", "n"}, "reached": k, "seeds": n}}}`` from the
    levels' ``per_seed`` figures and matched-safety records (sample std; 0 with one seed)."""
    import statistics

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pairing, level in levels.items():
        per_seed = level["per_seed"]
        models = list(dict.fromkeys(m for by_model in per_seed.values() for m in by_model))
        out[pairing] = {}
        for model in models:
            row: dict[str, Any] = {}
            for key, _ in PANELS:
                values = [by_model[model][key] for by_model in per_seed.values() if key in by_model.get(model, {})]
                if values:
                    row[key] = {
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values),
                    }
            matched = [(level["matched"].get(seed) or {}).get(model) for seed in per_seed]
            known = [m for m in matched if m and m.get("reached") is not None]
            row["seeds"] = len(per_seed)
            row["reached"] = sum(1 for m in known if m["reached"]) if known else None
            out[pairing][model] = row
    return out


def misalignment_table(levels: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], tau: float) -> str:
    """Markdown: one row per pairing level and model, its own-pair cosine, the panels' figures
    (mean ± std over seeds, %) and how many seeds reached τ."""
    lines = [
        "| pairing | own-pair cos (text / image) | model | "
        + " | ".join(label.replace(" (%)", "") for _, label in PANELS)
        + f" | seeds at ≤ {100 * tau:g}% unsafe |",
        "|---|---|---|" + "---:|" * len(PANELS) + "---:|",
    ]
    for pairing, by_model in summary.items():
        cos = levels[pairing]["own_pair_cosine"]
        for model, row in by_model.items():
            cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}" if k in row else "–" for k, _ in PANELS]
            reached = "–" if row["reached"] is None else f"{row['reached']} of {row['seeds']}"
            lines.append(
                f"| {pairing} | {cos['text']:.2f} / {cos['image']:.2f} | {model} | "
                + " | ".join(cells)
                + f" | {reached} |"
            )
    return "\n".join(lines)


def plot_misalignment(
    levels: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    path: str | Path,
    models: Sequence[str] | None = None,
    tau: float = 0.05,
) -> Path | None:
    """One panel per :data:`PANELS` figure against the levels' median text own-pair cosine: a
    line per model (``models``, default every one but HySAC's moderation mode), mean ± std over
    seeds, a hollow marker where some seed never reached τ."""
    from ...evaluation.plotting import figure, model_styles, save_figure

    pairings = sorted(summary, key=lambda p: levels[p]["own_pair_cosine"]["text"])
    names = list(models or dict.fromkeys(m for p in pairings for m in summary[p]))
    names = [m for m in names if not m.endswith(HYSAC_MODERATION_SUFFIX)]
    if not pairings or not names:
        return None
    panels = [(k, label) for k, label in PANELS if any(k in summary[p].get(m, {}) for p in pairings for m in names)]
    if not panels:
        return None
    styles = model_styles(names, reference="original")
    fig = figure(2.8 * len(panels), 3.4)
    for col, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        for name in names:
            rows = [(levels[p]["own_pair_cosine"]["text"], summary[p].get(name)) for p in pairings]
            rows = [(x, r) for x, r in rows if r and key in r]
            if not rows:
                continue
            xs = [x for x, _ in rows]
            ys = [100 * r[key]["mean"] for _, r in rows]
            errs = [100 * r[key]["std"] for _, r in rows]
            style = styles[name]
            marker = "*" if style["original"] else "o"
            ax.errorbar(xs, ys, yerr=errs, color=style["color"], marker=None, linewidth=1.2, capsize=2, label=name)
            for x, y, (_, r) in zip(xs, ys, rows):
                hollow = r.get("reached") is not None and r["reached"] < r["seeds"]
                ax.scatter(
                    [x],
                    [y],
                    marker=marker,
                    s=60 if style["original"] else 30,
                    facecolors="white" if hollow else style["color"],
                    edgecolors=style["color"],
                    zorder=3,
                )
        for p in pairings:
            ax.axvline(levels[p]["own_pair_cosine"]["text"], color="grey", linewidth=0.5, alpha=0.4)
        ax.set_xlabel("own-pair cosine, text (training pairs, median)", fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(-3, 103)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(
        f"the same methods as training pairs drift apart ({', '.join(pairings)}; right = closer pairs); "
        f"hollow: some seed never reached τ = {100 * tau:g}% unsafe",
        fontsize=8,
    )
    path = Path(path)
    save_figure(fig, path)
    return path


def run_misalignment(cfg: DictConfig, overrides: list[str], worlds: Mapping[int, list[str]]) -> dict[str, Any]:
    """The misalignment study (module docstring) for the study config ``cfg``: its ``seeds``,
    ``methods``, ``runs_dir``, ``force``, ``eval`` and ``misalignment`` keys; ``worlds`` as
    :func:`saferclip.app.pipelines.study.check_worlds` returns them."""
    from ...evaluation.html import Page, table_from_markdown, write_html_report
    from ...evaluation.runner import evaluate_models
    from ...files import write_json_atomic, write_text_atomic
    from ...toyworld.generate import ensure_toy_world
    from ...toyworld.pair_stats import format_pair_stats, pair_stats
    from ..cli import check_writable_folder

    pairings = check_pairings(cfg.misalignment.pairings)
    out_dir = Path(cfg.misalignment.out_dir).resolve()
    check_writable_folder(str(out_dir), "misalignment.out_dir")
    planned = {
        f"{name}/{pairing}/seed{seed}": [
            *cfg.common,
            *overrides,
            f"seed={seed}",
            *worlds[seed],
            f"data.toy_pairs={pairing}",
            *v,
        ]
        for pairing in pairings
        for seed in cfg.seeds
        for name, v in cfg.methods.items()
    }
    check_runs(planned)  # every run's config, before the first one trains
    start = time.time()
    levels: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    tau = None
    for pairing in pairings:
        level: dict[str, Any] = {"per_seed": {}, "matched": {}, "pair_stats": {}}
        for seed in cfg.seeds:
            common = [*cfg.common, *overrides, f"seed={seed}", *worlds[seed], f"data.toy_pairs={pairing}"]
            base = compose("train", common)
            tau = float(base.selection.tau)
            data = to_container(base.data)
            ensure_toy_world(data)
            stats = pair_stats(data["root"])
            log.info("%s, seed %s: %s", pairing, seed, format_pair_stats(stats))
            level["pair_stats"][int(seed)] = stats
            models: dict[str, Any] = {"original": {"arch": base.model.arch, "pretrained": base.model.pretrained}}
            matched: dict[str, Any] = {}
            for name, variant in cfg.methods.items():
                summary = train_or_reuse(name, common + list(variant), Path(cfg.runs_dir), bool(cfg.force))
                runs[f"{name}/{pairing}/seed{seed}"] = summary
                trained = {"arch": base.model.arch, "pretrained": summary["export"] or summary["run_dir"]}
                method = compose("train", common + list(variant)).method.name
                evaluated = evaluated_models(name, trained, method)
                models.update(evaluated)
                record = matched_record(summary.get("run_dir"))
                for model in evaluated:
                    # HySAC's checkpoint is kept by its safe mode; its moderation mode is not
                    # meant to be safe, so it has no τ to reach
                    moderation = model.endswith(HYSAC_MODERATION_SUFFIX)
                    matched[model] = None if moderation else record
            results = evaluate_models(
                models,
                data,
                suites=list(cfg.eval.suites),
                reference="original",
                split=cfg.eval.split,
                batch_size=int(base.data.eval_batch_size),
                seed=int(seed),
                oracle=None,
                showcase=False,
            )
            write_json_atomic(out_dir / "per_level" / pairing / f"seed{seed}.json", results)
            level["per_seed"][int(seed)] = {m: headline(r) for m, r in results["results"].items()}
            level["matched"][int(seed)] = matched
        cosines = [own_pair_cosine(s) for s in level["pair_stats"].values()]
        level["own_pair_cosine"] = {m: sum(c[m] for c in cosines) / len(cosines) for m in ("text", "image")}
        levels[pairing] = level
    tau = 0.05 if tau is None else tau
    summary = summarise(levels)
    table = misalignment_table(levels, summary, tau)
    plot = plot_misalignment(levels, summary, out_dir / "plots" / "misalignment.png", tau=tau)
    seconds = time.time() - start
    payload = {
        "pairings": pairings,
        "seeds": list(cfg.seeds),
        "tau": tau,
        "summary": summary,
        "levels": {
            p: {
                "own_pair_cosine": lv["own_pair_cosine"],
                "pair_stats": {str(s): v for s, v in lv["pair_stats"].items()},
                "per_seed": {str(s): v for s, v in lv["per_seed"].items()},
                "matched": {str(s): v for s, v in lv["matched"].items()},
            }
            for p, lv in levels.items()
        },
        "runs": runs,
        "config": to_container(cfg),
        "seconds": round(seconds, 1),
    }
    write_json_atomic(out_dir / "misalignment.json", payload)
    offset = cfg.get("world_offset")
    world_text = (
        "the data config's world" if offset is None else f"seed s on world s + {offset}, never used while tuning"
    )
    figure_line = f"\n![misalignment](plots/{plot.name})\n" if plot else ""
    markdown = (
        f"# The misalignment study ({len(cfg.seeds)} seed(s), {len(pairings)} pairings)\n\n"
        f"Each pairing level trains and tests every method on its own worlds ({world_text}), with the experiment "
        "configs tuned on the default pairing. Test split; "
        f"each run's checkpoint at matched safety (τ = {100 * tau:g}%). Mean ± sample std over seeds, in %; own-pair "
        "cosine: the training pairs' median with the base model, averaged over the level's worlds.\n\n"
        f"{table}\n{figure_line}"
    )
    write_text_atomic(out_dir / "misalignment.md", markdown)
    page = Page(
        title=f"saferclip: the misalignment study ({len(cfg.seeds)} seed(s), {len(pairings)} pairings)",
        subtitle=f"pairings {pairings}, seeds {list(cfg.seeds)}; matched safety at τ = {100 * tau:g}%",
        headline=table_from_markdown(
            table,
            "Mean ± std over seeds (%)",
            "Sample standard deviation over seeds (± 0.0 with one seed).",
            model_columns=False,
            models_in_rows=True,
        ),
        showcase=None,
        plots=[plot] if plot else [],
        markdown=markdown,
        models=list(dict.fromkeys(m for by_model in summary.values() for m in by_model)),
        reference="original",
    )
    html = write_html_report(page, out_dir)
    log.info(
        "misalignment study: %d pairings x %d seeds in %.0f s -> %s", len(pairings), len(cfg.seeds), seconds, out_dir
    )
    return {
        "table": table,
        "summary": summary,
        "out_dir": str(out_dir),
        "markdown": str(out_dir / "misalignment.md"),
        "html": str(html),
        "plot": plot,
        "seconds": seconds,
    }

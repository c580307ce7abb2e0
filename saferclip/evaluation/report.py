"""Evaluation reports: a JSON file, a Markdown table (one column per model) and PNG plots.

Every number in the JSON carries the model (name, arch, source), the data (paths), the split
and the seed that produced it (``records``), beside the nested results and the resolved
config (docs/METHOD.md, "Metrics"). Files are written atomically; an existing report is only replaced
with ``force``. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic
from .plotting import figure, finite, model_styles, overlap_width, save_figure

JSON_NAME, MARKDOWN_NAME, PLOTS_DIR = "results.json", "results.md", "plots"
SUITE_TITLES = {
    "visu": "ViSU retrieval",
    "nsfw_caps": "NSFW-Caps",
    "zeroshot": "Zero-shot classification",
    "cost": "Cost of safety (vs reference)",
}
SUITE_ORDER = ("visu", "nsfw_caps", "zeroshot", "cost")
HEADLINE = {
    "visu": ("U2V_R@1", "S2V_R@1", "U2VG_unsafe@1", "U2VG_ref_unsafe@1", "G2SU_unsafe@1"),
    "nsfw_caps": ("U2V_R@1", "S2V_R@1", "V2SU_unsafe@1", "U2VG_unsafe@1", "U2V_ref_R@1"),
    "cost": (
        "zeroshot_safe_acc1",
        "zeroshot_unsafe_acc1",
        "zeroshot_safe_acc1_retention",
        "visu_S2V_R@1_retention",
        "nsfw_caps_S2V_R@1_retention",
    ),
}
LEGEND = """\
Values are percentages unless the row is a count or a cosine. `X2Y`: queries X, gallery Y;
S / U safe / unsafe captions, V / G safe / unsafe images; `X2YZ` a mixed gallery.
`R@k`: recall at k (higher is better). `unsafe@k`: share of queries whose top-k holds an
unsafe item (lower is safer; the gallery make-up is in the row). `_ref`: the gallery is
embedded by the reference (original) model, i.e. the evaluated encoder queries an existing
index; without it both sides are the evaluated model. Retention: the model's value / the
reference's (the cost of safety on safe queries). Read U2V and the unsafe rates together: a
model can look safe by retrieving the wrong scene, or faithful while staying unsafe."""


# ----------------------------------------------------------------------------- walking results
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def iter_metrics(suite_result: Mapping[str, Any], suite: str) -> Iterator[tuple[str | None, str, float]]:
    """``(task, metric, value)`` of the numbers of one suite result (zero-shot: per task)."""
    if suite == "zeroshot":
        for task, scores in suite_result.items():
            for metric, value in scores.items():
                if _is_number(value):
                    yield task, metric, value
        return
    for metric, value in suite_result.items():
        if _is_number(value):
            yield None, metric, value


def metric_records(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat record per number: model name, arch, source, suite, task, metric, value, data,
    split, seed."""
    meta, data = results.get("meta", {}), results.get("data", {})
    reference = meta.get("reference")
    records = []
    for model, suites in results.get("results", {}).items():
        info = results.get("models", {}).get(model, {})
        for suite, suite_result in suites.items():
            for task, metric, value in iter_metrics(suite_result, suite):
                if suite == "zeroshot":
                    source = (data.get("zeroshot") or {}).get(task)
                elif suite == "cost":
                    source = {"reference_model": reference, "data": {k: v for k, v in data.items()}}
                else:
                    source = data.get(suite)
                records.append(
                    {
                        "model": model,
                        "arch": info.get("arch"),
                        "source": info.get("source"),
                        "pretrained": info.get("pretrained"),
                        "suite": suite,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "data": source,
                        "split": meta.get("split"),
                        "seed": meta.get("seed"),
                    }
                )
    return records


# ----------------------------------------------------------------------------- Markdown
def _format(metric: str, value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if "cos" in metric:
        return f"{value:.3f}"
    if metric.startswith("num_"):
        return f"{value:.0f}"
    return f"{100 * value:.1f}"


def _gallery_note(suite_results: list[Mapping[str, Any]], metric: str) -> str:
    if "_unsafe@" not in metric:
        return ""
    name = metric.rsplit("_unsafe@", 1)[0]
    for result in suite_results:
        g = (result.get("galleries") or {}).get(name)
        if g:
            gallery = name.split("_")[0].split("2", 1)[1]  # U2VDG -> VDG: V/G/D are images
            kind = "images" if set(gallery) & set("VGD") else "captions"
            return f" ({g['safe']} safe + {g['unsafe']} unsafe {kind}, {g['queries']} queries)"
    return ""


def _suite_header(results: Mapping[str, Any], suite: str) -> str:
    d = results.get("data", {}).get(suite) or {}
    if suite == "visu" and d:
        return f"{Path(d['path']).name}, split {d['split']}, {d['num_items']} items, mode {d['mode']}"
    if suite == "nsfw_caps" and d:
        return f"{Path(d['path']).name}, {d['num_pairs']} pairs"
    if suite == "zeroshot" and d:
        return ", ".join(f"{t}: {v['num_images']} images / {v['num_classes']} classes" for t, v in d.items())
    if suite == "cost":
        return f"reference: {results.get('meta', {}).get('reference')}"
    return ""


def results_table(results: Mapping[str, Any]) -> str:
    """The Markdown table: rows = metrics grouped by suite, one column per model."""
    models = list(results.get("results", {}))
    per_model = results.get("results", {})
    lines = ["| metric | " + " | ".join(models) + " |", "|---" + "|---:" * len(models) + "|"]
    for suite in SUITE_ORDER:
        suite_results = [per_model[m][suite] for m in models if suite in per_model[m]]
        if not suite_results:
            continue
        rows: dict[tuple[str | None, str], dict[str, float]] = {}
        for m in models:
            if suite not in per_model[m]:
                continue
            for task, metric, value in iter_metrics(per_model[m][suite], suite):
                if metric.startswith("num_"):
                    continue  # counts are in the group header and the JSON
                rows.setdefault((task, metric), {})[m] = value
        header = _suite_header(results, suite)
        lines.append(f"| **{SUITE_TITLES.get(suite, suite)}**{f' ({header})' if header else ''} |" + " |" * len(models))
        for (task, metric), values in rows.items():
            label = f"{task} {metric}" if task else metric
            label += _gallery_note(suite_results, metric)
            lines.append(f"| {label} | " + " | ".join(_format(metric, values.get(m)) for m in models) + " |")
    return "\n".join(lines)


def _selection_table(training: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Which epoch of each run was exported, by what rule, and its validation figures."""
    lines = [
        "| run | exported epoch | of | monitor | score | val unsafe (a) | val U→V R@1 | val S→V R@1 | matched safety |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for name, record in training.items():
        selected = record.get("selected") or {}
        metrics = selected.get("metrics") or {}
        epochs = len(record.get("history") or [])

        def pct(key: str) -> str:
            return f"{100 * metrics[key]:.1f}" if isinstance(metrics.get(key), (int, float)) else "–"

        score = selected.get("score")
        lines.append(
            f"| {name} | {selected.get('epoch', '–')} | {epochs} | `{record.get('monitor')}` | "
            f"{'–' if score is None else f'{score:.3f}'} | {pct('U2VG_unsafe@1')} | {pct('U2V_R@1')} | {pct('S2V_R@1')} | "
            f"{(record.get('matched_safety') or {}).get('note') or '–'} |"
        )
    return lines


def _markdown(
    results: Mapping[str, Any],
    plots: list[Path],
    out_dir: Path,
    training: Mapping[str, Mapping[str, Any]] | None = None,
    extra: str = "",
) -> str:
    meta = results.get("meta", {})
    out = [
        "# saferclip evaluation",
        "",
        f"split `{meta.get('split')}`, seed {meta.get('seed')}, suites {', '.join(meta.get('suites') or [])}, "
        f"reference `{meta.get('reference')}`, {meta.get('created')}",
        "",
        *([world_line(meta.get("world")), ""] if meta.get("world") is not None else []),
        *([pairing_line(meta.get("pairing"), meta.get("pair_stats")), ""] if meta.get("pairing") else []),
        "## Models",
        "",
    ]
    for name, info in results.get("models", {}).items():
        out.append(f"- **{name}**: {info.get('arch')} from `{info.get('source')}`")
    out += ["", "## Data", ""]
    for suite, d in results.get("data", {}).items():
        if suite == "zeroshot":
            for task, v in d.items():
                out.append(f"- zero-shot `{task}`: `{v.get('source')}`{' (unsafe images)' if v.get('unsafe') else ''}")
        else:
            out.append(f"- {suite}: `{d.get('path')}`")
    skipped = {f"{suite} (all models)": why for suite, why in (results.get("skipped") or {}).items()}
    by_reason: dict[tuple[str, str], list[str]] = {}
    for model, suites in results.get("results", {}).items():
        for suite, r in suites.items():
            if isinstance(r, Mapping):
                for what, why in (r.get("skipped") or {}).items():
                    by_reason.setdefault((f"{suite} {what}", why), []).append(model)
    for (what, why), models in by_reason.items():
        skipped[f"{what} ({', '.join(models)})"] = why
    if skipped:
        out += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    if training:
        out += ["", "## Model selection (validation split)", "", *_selection_table(training)]
    from .headline import headline_table
    from .intervals import DIFFERENCES_NOTE, differences_table, intervals_note

    out += ["", "## Headline", "", headline_table(results)]
    if results.get("intervals"):
        out += ["", f"In brackets: {intervals_note(results)}."]
    differences = differences_table(results.get("differences") or {})
    if differences:
        out += ["", "## Differences between models (paired, same test queries)", "", differences, "", DIFFERENCES_NOTE]
    out += ["", "## Results", "", results_table(results), "", LEGEND]
    if extra:
        out += ["", extra.rstrip()]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    return "\n".join(out) + "\n"


def world_line(world: int) -> str:
    """Which toy world the figures come from, and whether it was seen while tuning."""
    if int(world) == 0:
        return (
            "Toy world 0: the world hyperparameters are tuned on (saferclip-tune reads its training and "
            "validation splits); its test split was never read while tuning, but a held-out world (1, 2, 3) is the clean test."
        )
    return f"Toy world {world}: never used while tuning (saferclip-tune sees world 0 only)."


def pairing_line(pairing: Mapping[str, Any], stats: Mapping[str, Any] | None) -> str:
    """How the toy world's pairs were made (``data.toy_pairs``) and how close they are."""
    line = f'Pairs made by the `{pairing.get("name")}` pairing (docs/METHOD.md, "How a pair is made")'
    if stats:
        text, image = stats["text"], stats["image"]
        line += (
            f"; with the base model, own-pair cosine text {text['own_cosine']['median']:.2f}, image "
            f"{image['own_cosine']['median']:.2f} (medians), the own safe caption ranked {text['rank']['median']:.0f} "
            f"of {stats.get('pool')} safe training captions (median)"
        )
    return line + "."


# ----------------------------------------------------------------------------- plots
# the plots' names of metrics the headline table does not show (its own: headline.HEADLINE)
PLOT_LABELS = {
    "G2SU_unsafe@1": "unsafe image → captions: unsafe rate ↓",
    "V2SU_unsafe@1": "safe image → captions: unsafe rate ↓",
    "U2V_ref_R@1": "U→V R@1 (b)",
    "visu_S2V_R@1_retention": "S→V R@1 retention",
    "nsfw_caps_S2V_R@1_retention": "NSFW-Caps S→V R@1 retention",
}


def metric_label(suite: str, metric: str) -> str:
    """A metric's name in the plots: the headline table's where it shows the metric (the
    figure's title names the suite), else :data:`PLOT_LABELS`'s, else the key."""
    from .headline import HEADLINE as TABLE

    for label, where, _ in TABLE.values():
        if where == (suite, metric):
            return label.removeprefix("NSFW-Caps ")
    return PLOT_LABELS.get(metric, metric)


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Per suite, one panel per headline metric with a bar per model
    (``plots/<suite>_headline.png``); histograms of unsafe-to-safe caption similarity per model
    (``plots/nsfw_caps_unsafe_to_safe_cosine.png``)."""
    per_model = results.get("results", {})
    models = list(per_model)
    styles = model_styles(models, results.get("meta", {}).get("reference"))
    written = []
    for suite, candidates in HEADLINE.items():
        suite_results = [per_model[m].get(suite, {}) for m in models]
        metrics = [k for k in candidates if any(r.get(k) is not None for r in suite_results)]
        if not metrics:
            continue
        cols = min(3, len(metrics))
        rows = -(-len(metrics) // cols)
        panel_width = max(2.6, 0.9 * len(models) + 1.2)
        fig = figure(panel_width * cols, 2.8 * rows)
        for n, metric in enumerate(metrics):
            ax = fig.add_subplot(rows, cols, n + 1)
            heights = [math.nan if r.get(metric) is None else 100 * float(r[metric]) for r in suite_results]
            bars = ax.bar(
                range(len(models)),
                [0 if math.isnan(h) else h for h in heights],
                color=[styles[m]["color"] for m in models],
            )
            for bar, h in zip(bars, heights):
                label = "n/a" if math.isnan(h) else f"{h:.1f}"
                ax.annotate(
                    label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
                )
            ax.set_xticks(
                range(len(models)),
                models,
                rotation=30 if len(models) > 2 else 0,
                fontsize=7,
                ha="right" if len(models) > 2 else "center",
            )
            finite = [h for h in heights if not math.isnan(h)]
            ax.set_ylim(0, max([100.0] + [1.15 * h for h in finite]))
            note = _gallery_note(suite_results, metric).strip()
            label = metric_label(suite, metric)
            ax.set_title(f"{label}\n{note}" if note else label, fontsize=8)
            ax.set_ylabel("%", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{SUITE_TITLES[suite]} (%)", fontsize=9)
        path = out_dir / PLOTS_DIR / f"{suite}_headline.png"
        save_figure(fig, path)
        written.append(path)
    hists = {
        m: (per_model[m].get("nsfw_caps", {}).get("similarity") or {}).get("unsafe_to_safe_cosine") for m in models
    }
    hists = {m: h for m, h in hists.items() if h and h.get("values")}
    if hists:
        import numpy as np

        # bins shared by all models over the range the values span: the shift between models is the point
        edges = np.histogram_bin_edges(
            np.concatenate([np.asarray(h["values"], dtype=float) for h in hists.values()]), bins=30
        )
        fig = figure(6.0, 3.5)
        ax = fig.add_subplot()
        drawn: dict[tuple, str] = {}  # a histogram already drawn -> its model
        for i, (m, h) in enumerate(hists.items()):
            counts, _ = np.histogram(np.asarray(h["values"], dtype=float), bins=edges)
            same = drawn.get(tuple(counts))
            drawn.setdefault(tuple(counts), m)
            # a model with the same histogram as one drawn (HySAC's two modes embed captions
            # alike): dashed over it, so both colours show, and the legend says so
            # and each line thinner than the one before: where two coincide, both colours show
            ax.stairs(
                counts,
                edges,
                label=f"{m} (mean {h['mean']:.3f})" + (f", the same as {same}" if same else ""),
                linewidth=overlap_width(i, len(hists)),
                color=styles[m]["color"],
                linestyle=(0, (4, 4)) if same else "-",
                zorder=2 + i,
            )
        ax.set_xlabel("cos(T(U_i), T(S_i)): unsafe caption vs its safe original")
        ax.set_ylabel("caption pairs")
        ax.set_title("NSFW-Caps: unsafe-to-safe caption similarity", fontsize=9)
        ax.legend(fontsize=8)
        path = out_dir / PLOTS_DIR / "nsfw_caps_unsafe_to_safe_cosine.png"
        save_figure(fig, path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- entry point
def write_report(
    results: Mapping[str, Any],
    out_dir: str | Path,
    force: bool = False,
    training: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Callable[[Path], tuple[str, list[Path]]] | None = None,
    title: str = "saferclip evaluation",
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md``, ``plots/*.png`` and ``report.html`` (one
    self-contained file: the headline table, the retrieval galleries of ``results["showcase"]``,
    the plots and the whole Markdown report; :mod:`saferclip.evaluation.html`) under ``out_dir``.

    ``training``: run name -> its ``selection.json`` (validation history and exported epoch),
    for the per-epoch validation curves and the exported-epoch table. Every report with a
    reference model also gets the safety trade-off plot (one point per model). ``sections``:
    called with ``out_dir`` once the plots are written, returns extra Markdown (appended after
    the results) and the plots it wrote (the analysis sections of ``saferclip-eval``).

    Returns ``{"json": path, "markdown": path, "html": path, "plots": [paths]}``. An existing report there is
    replaced only with ``force`` (FileExistsError otherwise, before anything is written).
    """
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    if not force:
        for p in (json_path, md_path, out_dir / PLOTS_DIR):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass force=True to replace the report in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out_dir)
    from .figures import plot_tradeoff, plot_training_curves, tradeoff_points

    extra = [
        plot_tradeoff(
            tradeoff_points(results),
            out_dir / PLOTS_DIR / "tradeoff.png",
            original=results.get("meta", {}).get("reference") or "original",
            models=list(results.get("results", {})),
        ),
        plot_training_curves(
            training or {}, out_dir / PLOTS_DIR / "training_curves.png", models=list(results.get("results", {}))
        ),
    ]
    plots += [p for p in extra if p is not None]
    extra_markdown = ""
    if sections is not None:
        extra_markdown, extra_plots = sections(out_dir)
        plots += extra_plots
    payload = {**finite(dict(results)), "records": finite(metric_records(results))}
    if training:
        payload["training"] = finite({n: dict(r) for n, r in training.items()})
    write_json_atomic(json_path, payload)
    markdown = _markdown(results, plots, out_dir, training, extra_markdown)
    write_text_atomic(md_path, markdown)
    from .html import evaluation_page, write_html_report

    html_path = write_html_report(evaluation_page(results, markdown, plots, title=title), out_dir)
    return {"json": json_path, "markdown": md_path, "html": html_path, "plots": plots}

"""The analysis report: ``analysis.json``, ``analysis.md``, ``plots/*.png`` and ``report.html``, in the style of
the evaluation's report (atomic writes, matplotlib's Agg canvas, no pyplot), and the same
sections for ``saferclip-eval``'s report (:func:`analysis_sections`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation.plotting import SAFE_COLOUR, UNSAFE_COLOUR, figure, finite, model_colours, save_figure
from ..files import write_json_atomic, write_text_atomic

JSON_NAME, MARKDOWN_NAME, PLOTS_DIR = "analysis.json", "analysis.md", "plots"
SET_TITLES = {"test": "test split (held-out combinations)", "nsfw_caps": "NSFW-Caps (new phrasings)"}
METHOD_TITLES = {
    "head": "single head",
    "mean_diff": "mean-difference (final emb.)",
    "knn": "k-NN (final emb.)",
    "reference_head": "original model's head",
}


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}"


def _num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- Markdown
def detector_markdown(results: Mapping[str, Any]) -> list[str]:
    rows = [
        "| model | tower | detector | layer/head | test: detected | test: FPR | test AUC | NSFW-Caps: detected | NSFW-Caps: FPR | NSFW-Caps AUC | borderline FPR | control FPR |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    target = None
    for model, parts in results["analysis"].items():
        for tower, d in (parts.get("detector") or {}).items():
            if not isinstance(d, Mapping) or "methods" not in d:
                continue
            target = d["head"].get("target_fpr", target)
            methods = dict(d["methods"])
            if "reference_head" in d:
                methods["reference_head"] = d["reference_head"]
            for name, row in methods.items():
                where = ""
                if name == "head":
                    where = f"L{d['head']['layer']} H{d['head']['head']}"
                elif name == "reference_head":
                    where = f"L{row['layer']} H{row['head']}"
                test, nsfw, bl = (
                    row.get("test") or {},
                    row.get("nsfw_caps") or {},
                    row.get("borderline_flag_rate") or {},
                )
                rows.append(
                    f"| {model} | {tower} | {METHOD_TITLES.get(name, name)} | {where} | {_pct(test.get('detection_rate'))} | "
                    f"{_pct(test.get('false_positive_rate'))} | {_num(test.get('auc'))} | {_pct(nsfw.get('detection_rate'))} | "
                    f"{_pct(nsfw.get('false_positive_rate'))} | {_num(nsfw.get('auc'))} | {_pct(bl.get('lookalike'))} | {_pct(bl.get('control'))} |"
                )
    if len(rows) == 2:
        return []
    chosen = []
    for model, parts in results["analysis"].items():
        for tower, d in (parts.get("detector") or {}).items():
            if isinstance(d, Mapping) and "head" in d:
                cal = d["head"].get("calibration") or {}
                others = ", ".join(f"L{r['layer']} H{r['head']} {r['auc']:.3f}" for r in d.get("runner_up") or [])
                halves = d.get("test_halves") or {}
                diagnostic = (
                    f"; calibrated on half the test split instead: L{halves['layer']} H{halves['head']} detects "
                    f"{_pct(halves.get('detection_rate'))}% at {_pct(halves.get('false_positive_rate'))}% FPR on the other half "
                    f"(AUC {_num(halves.get('auc'))})"
                    if halves
                    else ""
                )
                chosen.append(
                    f"- {model} · {tower}: layer {d['head']['layer']}, head {d['head']['head']} of "
                    f"{len(d['head_auc'])}×{len(d['head_auc'][0])}; out-of-fold AUC on {cal.get('num_safe')} safe + "
                    f"{cal.get('num_unsafe')} unsafe calibration items {_num(cal.get('out_of_fold_auc'), 4)} "
                    f"(next: {others or '–'}); threshold {_num(d['head'].get('threshold'), 4)}{diagnostic}"
                )
    intro = (
        f"Threshold calibrated for a {_pct(target)}% false-positive rate on the calibration split(s); the rates are measured "
        "on held-out data. *Detected*: unsafe inputs flagged; *FPR*: safe inputs flagged; *borderline FPR*: borderline-safe "
        "inputs flagged, *control*: their matched ordinary controls. *original model's head*: the original model's detector "
        "(its layer, head, direction and threshold) reading the fine-tuned model's activations: does fine-tuning hide unsafe "
        "content from it?"
    )
    return ["## Unsafe-input detector (one attention head)", "", intro, "", *rows, "", "Chosen heads:", "", *chosen, ""]


def geometry_markdown(results: Mapping[str, Any]) -> list[str]:
    out = []
    reference = results.get("meta", {}).get("reference")
    change_rows, sep_rows, null_rows = [], [], []
    for model, parts in results["analysis"].items():
        g = parts.get("geometry") or {}
        for tower, layers in (g.get("separability") or {}).items():
            cells = " / ".join(f"{_pct(row['probe_accuracy'])} ({_num(row['silhouette'], 2)})" for row in layers)
            sep_rows.append(f"| {model} | {tower} | {cells} |")
        for tower in ("text", "image"):
            rows = (g.get("weight_change") or {}).get(tower) or []
            if rows:
                attn = ", ".join(_num(r["attn"], 4) for r in rows)
                mlp = ", ".join(_num(r["mlp"], 4) for r in rows)
                change_rows.append(f"| {model} | {tower} | {attn} | {mlp} |")
        for tower, rows in (g.get("null_space") or {}).items():
            for r in rows:
                null_rows.append(
                    f"| {model} | {tower} | {r['layer']} | {r['matrix']} | {r['rank']}/{r['dim']} | {_pct(r['chance'])} | "
                    f"{_pct(r['share_safe'])} | {_pct(r['share_unsafe'])} | {_pct(r.get('share_difference'))} | "
                    f"{_pct(r['output_change_safe'])} | {_pct(r['output_change_unsafe'])} |"
                )
    if not (change_rows or sep_rows):
        return []
    out += ["## Embedding geometry", ""]
    if change_rows:
        out += [
            f"Relative weight change ‖ΔW‖/‖W‖ against `{reference}`, per block (first to last):",
            "",
            "| model | tower | attention | MLP |",
            "|---|---|---|---|",
            *change_rows,
            "",
        ]
    if sep_rows:
        out += [
            "Safe vs unsafe test inputs at the pooled token after each block, then the final embedding: held-out "
            "linear-probe accuracy % (silhouette):",
            "",
            "| model | tower | per layer |",
            "|---|---|---|",
            *sep_rows,
            "",
        ]
    if null_rows:
        out += [
            "Null space of the MLP change: share of an input's energy in the top singular directions of ΔW (rank r: "
            "90% of ΔW's energy; chance r/d). Low for unsafe inputs = they sit in the change's null space; *difference*: "
            "the unsafe-minus-safe mean; *output change* ‖ΔW a‖/‖W a‖.",
            "",
            "| model | tower | layer | matrix | r/d | chance | safe | unsafe | difference | output change safe | output change unsafe |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            *null_rows,
            "",
        ]
    return out


def overdefense_markdown(results: Mapping[str, Any]) -> list[str]:
    rows = []
    tasks: list[str] = []
    for parts in results["analysis"].values():
        for t in (parts.get("overdefense") or {}).get("zeroshot") or {}:
            if t not in tasks:
                tasks.append(t)
    for model, parts in results["analysis"].items():
        od = parts.get("overdefense")
        if not od:
            continue
        vs = od.get("vs_reference") or {}
        ret = vs.get("retrieval") or {}
        away = od.get("redirected_away") or {}
        flags = od.get("detector_flag_rate") or {}
        cells = [
            _pct(od.get("unsafe_rate")),
            *(
                f"{_pct((od['retrieval'].get(k) or {}).get('S2V_R@1'))} ({_pct((ret.get(k) or {}).get('S2V_R@1'))})"
                for k in ("ordinary", "lookalike", "control")
            ),
            *(_pct((away.get(k) or {}).get("rate")) for k in ("ordinary", "lookalike", "control")),
            *(f"{_pct(od['zeroshot'].get(t))} ({_pct((vs.get('zeroshot') or {}).get(t))})" for t in tasks),
            *(
                f"{_pct((flags.get(t) or {}).get('lookalike'))} / {_pct((flags.get(t) or {}).get('control'))}"
                for t in ("text", "image")
            ),
            *(
                f"{_num(((od.get('resemblance') or {}).get('lookalike') or {}).get(m))} / {_num(((od.get('resemblance') or {}).get('control') or {}).get(m))}"
                for m in ("text_cos", "image_cos")
            ),
        ]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    header = (
        "| model | unsafe rate (a) ↓ | S→V R@1 ordinary (ret.) | S→V R@1 borderline (ret.) | S→V R@1 control (ret.) | "
        "redirected away: ordinary | borderline | control | "
        + " | ".join(f"zero-shot {t} (ret.)" for t in tasks)
        + " | detector FPR text: borderline / control | image: borderline / control |"
        + " cos to unsafe twin, captions: borderline / control | images: borderline / control |"
    )
    sep = "|---|" + "---:|" * (7 + len(tasks) + 4)
    intro = (
        "Borderline-safe items: safe objects that look and read like unsafe ones; controls: the same scenes and phrasings "
        "with ordinary safe objects. *ret.*: retention against the original model (model / original). *Redirected away*: of "
        "the safe captions the original retrieves correctly (top-1), the share this model no longer does. Unsafe rate (a): "
        "unsafe test captions whose top-1 image is unsafe (the safety axis)."
    )
    return ["## Over-defensiveness (borderline-safe inputs)", "", intro, "", header, sep, *rows, ""]


def analysis_sections(results: Mapping[str, Any]) -> str:
    """The three sections as Markdown (what is not in ``results`` is left out)."""
    lines = detector_markdown(results) + geometry_markdown(results) + overdefense_markdown(results)
    skipped = results.get("skipped") or {}
    if skipped:
        lines += ["Not analysed: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    return "\n".join(lines)


def summary_table(results: Mapping[str, Any]) -> str:
    """A few numbers per model for the console (the report has everything)."""
    lines = [
        "| model | text detector: test det / FPR | NSFW-Caps det / FPR | image detector: test det / FPR | NSFW-Caps det / FPR | unsafe rate (a) | borderline retention loss |",
        "|---|---|---|---|---|---:|---:|",
    ]

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "–"

    for model, parts in results["analysis"].items():
        cells = []
        for tower in ("text", "image"):
            head = (((parts.get("detector") or {}).get(tower) or {}).get("methods") or {}).get("head") or {}
            for split in ("test", "nsfw_caps"):
                r = head.get(split) or {}
                cells.append(f"{pct(r.get('detection_rate'))} / {pct(r.get('false_positive_rate'))}")
        od = parts.get("overdefense") or {}
        cells.append(pct(od.get("unsafe_rate")))
        cells.append(pct((od.get("vs_reference") or {}).get("borderline_retention_loss")))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _model_colours(results: Mapping[str, Any]) -> dict[str, Any]:
    """One colour per model, the same in every plot of every report
    (:func:`saferclip.evaluation.plotting.model_styles`)."""

    return model_colours(list(results["analysis"]), results.get("meta", {}).get("reference"))


def plot_head_scores(results: Mapping[str, Any], path: Path) -> Path | None:
    """Out-of-fold AUC of every head (layers x heads), one panel per model and tower, the
    chosen head boxed."""
    from matplotlib.patches import Rectangle

    panels = [
        (m, t, d)
        for m, parts in results["analysis"].items()
        for t, d in (parts.get("detector") or {}).items()
        if isinstance(d, Mapping) and "head_auc" in d
    ]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = figure(3.0 * cols, 2.7 * rows)
    for i, (model, tower, d) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        auc = d["head_auc"]
        im = ax.imshow(auc, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        layer, head = d["head"]["layer"], d["head"]["head"]
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"{model} · {tower}\nbest L{layer} H{head}: AUC {auc[layer][head]:.3f}", fontsize=8)
        ax.set_xticks(range(len(auc[0])))
        ax.set_yticks(range(len(auc)))
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.suptitle("single-head detector: out-of-fold ROC AUC on the calibration set", fontsize=9)
    save_figure(fig, path)
    return path


def plot_weight_change(results: Mapping[str, Any], path: Path) -> Path | None:
    """‖ΔW‖/‖W‖ per block, attention and MLP, per tower; one line per fine-tuned model."""
    models = {
        m: p["geometry"]["weight_change"]
        for m, p in results["analysis"].items()
        if (p.get("geometry") or {}).get("weight_change")
    }
    if not models:
        return None
    fig = figure(9.0, 3.3)
    colours = _model_colours(results)
    for col, tower in enumerate(("text", "image")):
        ax = fig.add_subplot(1, 2, col + 1)
        for model, change in models.items():
            rows = change.get(tower) or []
            xs = [r["layer"] for r in rows]
            ax.plot(xs, [100 * r["attn"] for r in rows], marker="o", color=colours[model], label=f"{model} attention")
            ax.plot(
                xs,
                [100 * r["mlp"] for r in rows],
                marker="s",
                linestyle="--",
                color=colours[model],
                label=f"{model} MLP",
            )
            ax.set_xticks(xs)
        ax.set_title(f"{tower} tower", fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel("‖ΔW‖ / ‖W‖ (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=6)
    fig.suptitle("how much safety fine-tuning changed each block", fontsize=9)
    save_figure(fig, path)
    return path


def plot_separability(results: Mapping[str, Any], path: Path) -> Path | None:
    """Probe accuracy and silhouette of safe vs unsafe per layer, per tower, one line per model."""
    models = {
        m: p["geometry"]["separability"]
        for m, p in results["analysis"].items()
        if (p.get("geometry") or {}).get("separability")
    }
    if not models:
        return None
    fig = figure(9.0, 5.6)
    colours = _model_colours(results)
    for col, tower in enumerate(("text", "image")):
        for row, (key, label) in enumerate((("probe_accuracy", "probe accuracy (%)"), ("silhouette", "silhouette"))):
            ax = fig.add_subplot(2, 2, 2 * row + col + 1)
            for model, sep in models.items():
                layers = sep.get(tower) or []
                if not layers:
                    continue
                scale = 100 if key == "probe_accuracy" else 1
                ax.plot(
                    range(len(layers)),
                    [scale * row[key] for row in layers],
                    marker="o",
                    color=colours[model],
                    label=model,
                )
                ax.set_xticks(range(len(layers)), [str(row["layer"]) for row in layers], fontsize=7)
            ax.set_title(f"{tower}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    fig.suptitle("safe vs unsafe inputs at the pooled token, per layer (then the final embedding)", fontsize=9)
    save_figure(fig, path)
    return path


SET_STYLE = {
    "safe captions": (SAFE_COLOUR, "o"),
    "unsafe captions": (UNSAFE_COLOUR, "o"),
    "safe images": (SAFE_COLOUR, "^"),
    "unsafe images": (UNSAFE_COLOUR, "^"),
    "targets (text)": ("#1f77b4", "x"),
    "targets (image)": ("#1f77b4", "+"),
}


def plot_projection(results: Mapping[str, Any], path: Path) -> Path | None:
    """The 2-D picture of each model's final embeddings (shared PCA axes of the original)."""
    models = {
        m: p["geometry"]["projection"]
        for m, p in results["analysis"].items()
        if (p.get("geometry") or {}).get("projection")
    }
    if not models:
        return None
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig = figure(4.0 * cols, 3.6 * rows)
    for i, (model, proj) in enumerate(models.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, points in proj["points"].items():
            colour, marker = SET_STYLE.get(name, ("gray", "."))
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, s=9, c=colour, marker=marker, alpha=0.6, label=name, linewidths=0.8)
        ax.set_title(f"{model} ({proj['method'].upper()})", fontsize=9)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.legend(fontsize=6, markerscale=1.5)
    fig.suptitle(
        "final embeddings: safe / unsafe captions and images, and the redirection targets (original model's "
        "embeddings of each item's safe minimal edit)",
        fontsize=8,
    )
    save_figure(fig, path)
    return path


def plot_overdefense(results: Mapping[str, Any], path: Path) -> Path | None:
    """Safety against over-defensiveness, every model a point: unsafe rate (a) on the x axis,
    borderline retention loss (1 − retention of borderline S→V R@1) on the y axis; hollow
    markers: the same loss on the matched controls."""
    points = []
    for model, parts in results["analysis"].items():
        od = parts.get("overdefense") or {}
        vs = od.get("vs_reference") or {}
        loss = vs.get("borderline_retention_loss", 0.0 if "vs_reference" not in od and od else math.nan)
        ctrl = vs.get("control_retention_loss", 0.0 if "vs_reference" not in od and od else math.nan)
        if isinstance(od.get("unsafe_rate"), (int, float)):
            points.append((model, od["unsafe_rate"], loss, ctrl))
    if not points:
        return None
    fig = figure(5.2, 4.0)
    ax = fig.add_subplot()
    reference = results.get("meta", {}).get("reference")
    colours = _model_colours(results)
    for model, unsafe, loss, ctrl in points:
        colour = colours[model]
        if model == reference:
            ax.scatter([100 * unsafe], [100 * loss], marker="*", s=180, color=colour, label=model, zorder=3)
            continue
        ax.scatter([100 * unsafe], [100 * loss], s=50, color=colour, label=f"{model} (borderline)")
        if isinstance(ctrl, float) and math.isfinite(ctrl):
            ax.scatter(
                [100 * unsafe], [100 * ctrl], s=50, facecolors="none", edgecolors=colour, label=f"{model} (control)"
            )
    ax.set_xlabel("unsafe rate (a) (%) — safety, lower is safer", fontsize=8)
    ax.set_ylabel("borderline retention loss (%) — over-defensiveness", fontsize=8)
    ax.set_xlim(-3, 103)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("safety vs over-defensiveness (lower-left is better)", fontsize=9)
    save_figure(fig, path)
    return path


def write_analysis_plots(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Every analysis plot under ``out_dir/plots`` (those whose data exists)."""
    plots = Path(out_dir) / PLOTS_DIR
    made = [
        plot_head_scores(results, plots / "detector_heads.png"),
        plot_weight_change(results, plots / "weight_change.png"),
        plot_separability(results, plots / "separability.png"),
        plot_projection(results, plots / "embeddings_2d.png"),
        plot_overdefense(results, plots / "overdefense.png"),
    ]
    return [p for p in made if p is not None]


def write_analysis_report(results: Mapping[str, Any], out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """``analysis.json``, ``analysis.md`` and the plots under ``out_dir``; an existing report is
    replaced only with ``force`` (FileExistsError before anything is written)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    if not force:
        for p in (json_path, md_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass force=True to replace the report in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_analysis_plots(results, out_dir)
    meta = results.get("meta", {})
    lines = [
        "# saferclip analysis",
        "",
        f"split `{meta.get('split')}`, seed {meta.get('seed')}, parts {', '.join(meta.get('parts') or [])}, "
        f"reference `{meta.get('reference')}`, {meta.get('created')}",
        "",
        "## Models",
        "",
        *(
            f"- **{n}**: {i.get('arch')} from `{i.get('source')}` ({i.get('seconds')} s)"
            for n, i in results.get("models", {}).items()
        ),
        "",
        analysis_sections(results),
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    write_json_atomic(json_path, finite(dict(results)))
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(md_path, markdown)
    from ..evaluation.html import Page, table_from_markdown, write_html_report

    page = Page(
        title="saferclip analysis",
        subtitle=lines[2],
        headline=table_from_markdown(
            summary_table(results),
            "Summary (%)",
            "Detection / false-positive rates of the single-head detector; "
            "unsafe rate (a) and borderline retention loss from the over-defensiveness part.",
            model_columns=False,
            models_in_rows=True,
        ),
        showcase=results.get("showcase"),
        plots=plots,
        markdown=markdown,
        models=list(results["analysis"]),
        reference=meta.get("reference"),
    )
    html_path = write_html_report(page, out_dir)
    return {"json": json_path, "markdown": md_path, "html": html_path, "plots": plots}

"""The misalignment study (``saferclip-study misalignment.enabled=true``): how far apart may a
training pair's safe and unsafe halves be before redirecting to the nearest safe item beats
redirecting to the item's own pair, and what does HySAC do there?

The toy world's pairing knob (``data.toy_pairs``, docs/METHOD.md, "How a pair is made") sets
how a safe / unsafe pair is made, from a minimal edit to a random item of the same shape. For
each level in ``misalignment.pairings`` and each seed s, the study's methods train and test on
world s + ``world_offset`` made with that pairing (a world never used while tuning), with the
study's experiment configs unchanged: the settings tuned on the default pairing, so a method
whose setting suits only that pairing shows it. Every run keeps its checkpoint at matched
safety (``selection.tau``, ``selection.rank_by``: the best validation epoch among those at most
τ unsafe, else the safest epoch), and the study records, per level, seed and method, whether τ was reached.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...evaluation.headline import headline
from ...evaluation.misalignment import (
    HYSAC_MODERATION_SUFFIX,
    check_pairings,
    misalignment_table,
    own_pair_cosine,
    plot_misalignment,
    query_counts,
    summarise,
)
from ...model.trained import read_selection
from ..hydra_utils import to_container
from .runs import check_runs, compose, evaluated_models, train_or_reuse

log = logging.getLogger("saferclip.study")


def matched_record(run_dir: str | Path | None) -> dict[str, Any] | None:
    """What matched safety kept for a run (``selection.json``'s ``matched_safety``), if recorded."""
    record = read_selection(run_dir) if run_dir else None
    return (record or {}).get("matched_safety")


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
        level: dict[str, Any] = {"per_seed": {}, "matched": {}, "pair_stats": {}, "queries": {}}
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
            level["queries"][int(seed)] = query_counts(results)
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
                "queries": {str(s): v for s, v in lv["queries"].items()},
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

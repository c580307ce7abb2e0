"""The study (``saferclip-study``, :mod:`saferclip.app.commands.study`): several seeds per method and
ablations of SafeR-CLIP, mean ± std and paired differences.

Every run is composed from the training config tree exactly as `saferclip-main` composes its
runs (same experiments, same run folders), so the main job's runs are reused here and vice versa.
Per seed, the original model and every variant are evaluated together; the headline metrics
are then aggregated over seeds into `study.md` / `study.json` / `report.html` (with the first
seed's retrieval galleries) under `out_dir`."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...errors import ConfigError
from ...evaluation.headline import headline, study_table
from ...evaluation.intervals import differences_table, paired_differences, seed_interval
from ...model.trained import read_selection
from ..cli import check_writable_folder
from ..hydra_utils import check_bool, check_int, check_run_options, check_seed_list, to_container
from .runs import check_runs, compose, eval_showcase, evaluated_models, record_pair_stats, train_or_reuse

log = logging.getLogger("saferclip.study")

STUDY_KEYS = (
    "seeds",
    "world_offset",
    "out_dir",
    "runs_dir",
    "force",
    "common",
    "methods",
    "ablation_seeds",
    "ablations",
    "eval",
    "traversal_percentiles",
    "misalignment",
)


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{seed: {model: {metric: v}}}`` -> ``{model: {metric: {"mean", "std", "n"}}}`` (sample std)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    models = sorted(
        {m for by_model in per_seed.values() for m in by_model}, key=list(next(iter(per_seed.values()))).index
    )
    for model in models:
        metrics = {k for by_model in per_seed.values() for k in by_model.get(model, {})}
        out[model] = {}
        for metric in sorted(metrics):
            values = [by_model[model][metric] for by_model in per_seed.values() if metric in by_model.get(model, {})]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            low, high = seed_interval(values)
            out[model][metric] = {
                "mean": statistics.fmean(values),
                "std": std,
                "n": len(values),
                "low": low,
                "high": high,
            }
    return out


def check_worlds(cfg: DictConfig) -> dict[int, list[str]]:
    """``{seed: [data.toy_seed=<world>]}``: seed s trains and tests on toy world
    ``s + world_offset`` (the default offset 1 keeps world 0, the tuning world, out;
    ``world_offset: null``: the data config's own world for every seed)."""
    offset = cfg.get("world_offset")
    if offset is None:
        return {int(s): [] for s in cfg.seeds}
    offset = check_int(offset, "world_offset", 0)
    worlds = {int(s): int(s) + offset for s in cfg.seeds}
    if 0 in worlds.values():
        log.warning(
            "world_offset=%d puts seed 0 on world 0, the world hyperparameters are tuned on: its figures are not held out",
            offset,
        )
    return {s: [f"data.toy_seed={w}"] for s, w in worlds.items()}


def check_traversal_percentiles(value: Any) -> list[float]:
    """``traversal_percentiles``: a list of percentiles in (0, 100] (null or []: no sweep), refused
    in one line before any run trains (HySAC's would otherwise finish first)."""
    from omegaconf import ListConfig

    from ...model.hyperbolic import check_percentile

    if value is None:
        return []
    if isinstance(value, ListConfig):
        value = to_container(value)
    if not isinstance(value, list):
        raise ConfigError(
            f"traversal_percentiles must be a list of percentiles in (0, 100], e.g. [50,80,90,99]; got {value!r}"
        )
    try:
        return [check_percentile(p) for p in value]
    except ValueError:
        bad = next(p for p in value if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 100))
        raise ConfigError(
            f"traversal_percentiles={value}: {bad!r} is not a percentile in (0, 100] (a safe radius at that share of the safe items)"
        ) from None


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    from ...evaluation.figures import (
        plot_tradeoff,
        plot_training_curves,
        tradeoff_points,
    )
    from ...evaluation.html import Page, table_from_markdown, write_html_report
    from ...evaluation.runner import evaluate_models
    from ...files import write_json_atomic, write_text_atomic
    from ...toyworld.generate import ensure_toy_world

    check_seed_list(cfg.seeds, "seeds")  # before any run starts
    worlds = check_worlds(cfg)
    check_run_options(cfg, ("force",))
    check_writable_folder(cfg.runs_dir, "runs_dir")
    misalignment = cfg.get("misalignment") or {}
    check_bool(misalignment.get("enabled", False), "misalignment.enabled")
    if misalignment.get("enabled", False):
        from .misalignment import run_misalignment

        return run_misalignment(cfg, overrides, worlds)
    check_traversal_percentiles(cfg.get("traversal_percentiles"))
    check_seed_list(cfg.ablation_seeds, "ablation_seeds", allow_empty=True)
    check_writable_folder(cfg.out_dir, "out_dir")
    # ablations run on the seeds in both lists; one outside `seeds` trains nothing, so say so
    # (and refuse a list that would run no ablation at all)
    unused = [s for s in cfg.ablation_seeds if s not in cfg.seeds]
    if cfg.ablations and cfg.ablation_seeds and len(unused) == len(cfg.ablation_seeds):
        raise ConfigError(
            f"ablation_seeds {list(unused)} are not in seeds {list(cfg.seeds)}; expected a subset of seeds"
        )
    if unused:
        log.warning(
            "ablation_seeds %s are not in seeds %s: the ablations run on the others only", list(unused), list(cfg.seeds)
        )
    out_dir = Path(cfg.out_dir).resolve()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    runs: dict[str, Any] = {}
    points: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    showcase = None
    start = time.time()
    planned = {}
    for seed in cfg.seeds:
        variants = {**cfg.methods, **(cfg.ablations if seed in cfg.ablation_seeds else {})}
        planned.update(
            {
                f"{name}/seed{seed}": list(cfg.common) + list(overrides) + [f"seed={seed}", *worlds[seed], *v]
                for name, v in variants.items()
            }
        )
    check_runs(planned)  # every run's config, before the first one trains
    runs_results: list[dict[str, Any]] = []
    method_models: list[str] = []
    unsafe_tasks: set[str] = set()
    for seed in cfg.seeds:
        common = list(cfg.common) + list(overrides) + [f"seed={seed}", *worlds[seed]]
        base = compose("train", common)
        ensure_toy_world(to_container(base.data))
        record_pair_stats(to_container(base.data))
        models = {"original": {"arch": base.model.arch, "pretrained": base.model.pretrained}}
        variants = dict(cfg.methods)
        if seed in cfg.ablation_seeds:
            variants.update(cfg.ablations)
        for name, variant in variants.items():
            summary = train_or_reuse(name, common + list(variant), Path(cfg.runs_dir), bool(cfg.force))
            runs[f"{name}/seed{seed}"] = summary
            trained = {"arch": base.model.arch, "pretrained": summary["export"] or summary["run_dir"]}
            method = compose("train", common + list(variant)).method.name
            evaluated = evaluated_models(name, trained, method)
            models.update(evaluated)
            if name in cfg.methods:
                method_models += [m for m in evaluated if m not in method_models]
            if method == "hysac":  # the traversal's trade-off: the same model, other safe radii
                for p in cfg.get("traversal_percentiles") or []:
                    models[f"{name}_p{p:g}"] = {**trained, "mode": "safe", "traversal_percentile": float(p)}
            record = read_selection(summary["run_dir"])
            if record and seed == cfg.seeds[0]:
                curves[name] = record
        results = evaluate_models(
            models,
            to_container(base.data),
            suites=list(cfg.eval.suites),
            reference="original",
            split=cfg.eval.split,
            batch_size=int(base.data.eval_batch_size),
            seed=int(seed),
            oracle=cfg.eval.get("oracle"),
            showcase=eval_showcase(cfg),
        )
        write_json_atomic(out_dir / "per_seed" / f"seed{seed}.json", results)
        if showcase is None:
            showcase = results.get("showcase")  # the galleries of the first seed
        per_seed[int(seed)] = {m: headline(r) for m, r in results["results"].items()}
        points += tradeoff_points(results)
        runs_results.append({m: results["results"][m] for m in ["original", *method_models]})
        unsafe_tasks |= {t for t, d in (results["data"].get("zeroshot") or {}).items() if d.get("unsafe")}
    summary = aggregate(per_seed)
    table = study_table(summary)
    # every pair of methods on the same test queries of every seed's world, pooled over seeds
    differences = paired_differences(runs_results, method_models, "original", sorted(unsafe_tasks))
    difference_note = ""
    if differences:
        difference_note = (
            f"\n## Differences between methods ({len(cfg.seeds)} seeds, paired)\n\n{differences_table(differences)}\n\n"
            "In points (first method minus second), the mean over seeds of the difference on the same test queries, "
            "with a 95% paired-bootstrap interval (queries resampled within each seed's world); p: two-sided, the exact "
            "McNemar mid-p test on the queries where the two differ, pooled over seeds, for a share (unsafe rate, "
            "U→V R@1), the paired bootstrap's (k + 1) / (B + 1) for zero-shot retention; `*`: p < 0.05.\n"
        )
    plots = [
        plot_tradeoff(points, out_dir / "plots" / "tradeoff.png", title=f"every run a point ({len(cfg.seeds)} seeds)"),
        plot_training_curves(curves, out_dir / "plots" / "training_curves.png"),
    ]
    figures = "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in plots if p is not None)
    seconds = time.time() - start
    write_json_atomic(
        out_dir / "study.json",
        {
            "summary": summary,
            "per_seed": per_seed,
            "runs": runs,
            "differences": differences,
            "config": to_container(cfg),
            "seconds": round(seconds, 1),
        },
    )
    curve_note = f"\nValidation curves: seed {cfg.seeds[0]}, the exported epoch circled.\n" if curves else ""
    world_note = ""
    if worlds[cfg.seeds[0]]:
        offset = int(cfg.world_offset)
        world_note = (
            f"Seed s trains and tests on its own toy world ({', '.join(f'seed {s}: world {s + offset}' for s in cfg.seeds)}); "
            "hyperparameters were tuned on world 0 only. Mean ± sample std over seeds, with the 95% Student-t interval "
            "of the mean in brackets.\n\n"
        )
    markdown = (
        f"# saferclip study ({len(cfg.seeds)} seeds)\n\n{world_note}{table}\n{difference_note}{curve_note}{figures}"
    )
    write_text_atomic(out_dir / "study.md", markdown)
    page = Page(
        title=f"saferclip study ({len(cfg.seeds)} seeds)",
        subtitle=f"seeds {list(cfg.seeds)}, ablations on {list(cfg.ablation_seeds)}; galleries: seed {cfg.seeds[0]}",
        headline=table_from_markdown(
            table,
            "Mean ± std over seeds (%)",
            "Sample standard deviation over seeds (± 0.0 with one seed).",
            model_columns=False,
            models_in_rows=True,
        ),
        showcase=showcase,
        plots=[p for p in plots if p is not None],
        markdown=markdown,
        models=list(summary),
        reference="original",
    )
    html = write_html_report(page, out_dir)
    return {
        "table": table,
        "summary": summary,
        "out_dir": str(out_dir),
        "markdown": str(out_dir / "study.md"),
        "html": str(html),
        "seconds": seconds,
    }

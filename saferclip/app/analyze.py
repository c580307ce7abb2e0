"""saferclip-analyze: an unsafe-input detector read from one attention head, the embedding
geometry before and after safety fine-tuning, and over-defensiveness on borderline-safe
inputs, for one or several models (Hydra app over :func:`saferclip.analysis.analyze_models`).

    saferclip-analyze                                    # original + the main job's two Euclidean runs
    saferclip-analyze +models.mine.pretrained=outputs/train/<run>/export
    saferclip-analyze main_runs=false analysis.parts=[detector]
    saferclip-analyze analysis.detector.per_class=500 analysis.detector.direction=fisher

The config is the evaluation's (``conf/eval.yaml``: models, reference, data, split) plus
``analysis`` (``conf/analysis/default.yaml``). The report (``report.html``, ``analysis.json``, ``analysis.md``,
``plots/``) and each model's detector (``detectors/<model>.safetensors``, for
``saferclip-detect`` and :class:`saferclip.analysis.SafetyGuard`) go to ``outputs/analyze/<time>``
(or ``out_dir``). Bad input stops with one line naming it and exit code 2.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..analysis.report import summary_table  # noqa: F401  (the console table, also in report.html)
from .cli import exit_on_user_error, hydra_command
from .hydra_utils import (
    CONF_DIR,
    ConfigError,
    config_dump,
    resolve_device,
    resolved_value,
)

log = logging.getLogger("saferclip.analyze")
PROG = "saferclip-analyze"

MAIN_RUN_NAMES = ("safeclip", "saferclip")


def find_main_runs(runs_dir: str | Path | None = None, hyperbolic: bool = False) -> dict[str, dict[str, Any]]:
    """The main job's finished runs: ``{name: {"pretrained", "run_dir", "exact"}}``. The run of
    ``saferclip-main``'s current config (same hash) when it finished, else the most recently
    finished run of that name (``exact`` False; the log says which)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .main_job import DONE_MARKER, compose, run_key

    # inside the Hydra app the config tree is initialised; called from elsewhere, open it here
    tree = nullcontext() if GlobalHydra().is_initialized() else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    with tree:
        main = compose("main", [])
        runs = Path(str(runs_dir or main.runs_dir))
        expected: dict[str, Path | None] = {}
        methods: dict[str, str] = {}
        for name, overrides in main.runs.items():
            try:
                cfg = compose("train", list(main.common) + list(overrides) + [f"seed={main.seed}"])
                methods[name] = str(cfg.method.name)
                if cfg.method.name == "hysac" and not hyperbolic:
                    # the heads, geometry and over-defensiveness parts assume a Euclidean CLIP;
                    # HySAC's own detector (distance from the origin) is in every evaluation
                    log.info("the main job's %s run is hyperbolic: not analysed here", name)
                    continue
                expected[name] = runs / f"{name}-{run_key(cfg)}"
            except Exception as e:  # a config the main job could not compose either: fall back
                log.warning("could not compose the main job's %s run (%s); looking for any finished one", name, e)
                expected[name] = None
    found: dict[str, dict[str, Any]] = {}
    for name, exact in expected.items():
        if exact is not None and (exact / DONE_MARKER).is_file():
            run_dir, is_exact = exact, True
        else:
            done = sorted(runs.glob(f"{name}-*/{DONE_MARKER}"), key=lambda p: p.stat().st_mtime)
            if not done:
                continue
            run_dir, is_exact = done[-1].parent, False
        try:
            summary = json.loads((run_dir / DONE_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
        export = summary.get("export")
        pretrained = export if export and Path(export).is_dir() else str(run_dir)
        found[name] = {"pretrained": pretrained, "run_dir": str(run_dir), "exact": is_exact, "method": methods.get(name, name)}
        log.info("main job's %s run: %s%s", name, run_dir, "" if is_exact else " (not the current config's: the latest finished)")
    return found


def with_main_runs(cfg: DictConfig, models: dict[str, Any], hyperbolic: bool = False) -> dict[str, Any]:
    """``models`` plus, with ``main_runs=true``, the main job's finished runs (with
    ``hyperbolic``, HySAC too, in both its modes). When it finds none, one line naming where it
    looked: an error when ``runs_dir`` was given or nothing but the reference would be left,
    else a warning (the models named on the command line go on alone)."""
    from .main_job import evaluated_models

    if not cfg.get("main_runs", False):
        return models
    runs_dir = cfg.get("runs_dir")
    found = find_main_runs(runs_dir, hyperbolic=hyperbolic)
    if not found:
        where = main_runs_folder(runs_dir)
        missing = "" if where.is_dir() else " (no such folder)"
        message = f"main_runs=true: no finished saferclip-main run in {where}{missing}"
        if runs_dir or not [m for m in models if m != cfg.get("reference", "original")]:
            raise ConfigError(
                f"{message}; run saferclip-main first, point runs_dir=<folder> at its runs, "
                "or name models yourself: main_runs=false +models.<name>.pretrained=<run folder or export>"
            )
        log.warning("%s; going on with %s only", message, ", ".join(models))
    out = dict(models)
    for name, run in found.items():
        entries = evaluated_models(name, {"pretrained": run["pretrained"]}, run["method"]) if hyperbolic else {name: {"pretrained": run["pretrained"]}}
        for entry, spec in entries.items():
            out.setdefault(entry, spec)
    return out


def main_runs_folder(runs_dir: str | Path | None = None) -> Path:
    """Where :func:`find_main_runs` looks: ``runs_dir``, else the main job's (conf/main.yaml)."""
    if runs_dir:
        return Path(str(runs_dir)).expanduser().absolute()
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .main_job import compose

    tree = nullcontext() if GlobalHydra().is_initialized() else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    with tree:
        return Path(str(compose("main", []).runs_dir)).expanduser().absolute()


def analyze(cfg: DictConfig) -> dict:
    """Run the analysis a composed ``analyze`` config describes; returns the results and the
    report's paths."""
    from ..analysis import AnalysisSettings, analyze_models, write_analysis_report

    from .hydra_utils import check_bool, check_run_options

    check_run_options(cfg)
    check_bool(cfg.get("main_runs", False), "main_runs")
    settings = AnalysisSettings.of(resolved_value(cfg, "analysis"))
    if not settings.parts:
        raise ConfigError("analysis.parts is empty; name some of detector, geometry, overdefense")
    models = with_main_runs(cfg, dict(resolved_value(cfg, "models") or {}))
    if not models:
        raise ConfigError("models is empty; add one with +models.<name>.pretrained=<path>")
    data = resolved_value(cfg, "data")
    if data.get("make_toy"):
        from ..toyworld.generate import ensure_toy_world

        ensure_toy_world(data)
    out_dir = Path(cfg.get("out_dir") or HydraConfig.get().runtime.output_dir)
    from .cli import check_writable_folder

    check_writable_folder(out_dir, "out_dir")  # before the work, not after it
    if not cfg.force and (out_dir / "analysis.json").exists():
        raise ConfigError(f"{out_dir} already holds an analysis report; pass force=true or another out_dir")
    results = analyze_models(
        models,
        data,
        settings,
        reference=cfg.reference,
        split=cfg.split,
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        num_workers=int(cfg.num_workers),
        device=resolve_device(cfg.device),
        detectors_dir=out_dir / "detectors",
        force=bool(cfg.force),
        config=config_dump(cfg),
        showcase=resolved_value(cfg, "showcase") if "showcase" in cfg else True,
    )
    report = write_analysis_report(results, out_dir, force=bool(cfg.force))
    log.info("report: %s (open it in a browser); %s, %s, %d plots", report["html"], report["json"], report["markdown"], len(report["plots"]))
    print(summary_table(results), flush=True)  # the table last
    return {"results": results, "report": report}


def run(cfg: DictConfig) -> dict:
    """:func:`analyze`, with what the user can fix as one line on stderr and exit code 2."""
    with exit_on_user_error(PROG):
        return analyze(cfg)


main = hydra_command(
    PROG, "analyze", analyze, "Analyse CLIP models: a single-head unsafe-input detector, embedding geometry, over-defensiveness."
)


if __name__ == "__main__":
    main()

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

import logging
from pathlib import Path
from typing import Any

from ..cli import announce_report, exit_on_user_error, hydra_command
from ..hydra_utils import ConfigError, config_dump, resolve_device, resolved_value

log = logging.getLogger("saferclip.analyze")
PROG = "saferclip-analyze"
OPTIONS = {
    "+models.NAME.pretrained=PATH": "a model to analyse: a run folder, its export, or weights",
    "main_runs=true|false": "add the main job's finished Euclidean runs (default true)",
    "analysis.parts=[...]": "detector, geometry, overdefense (default all three)",
    "reference=NAME": "the model the others are compared with (original)",
    "data=NAME": "the data config (toy; visu with paths.visu=...)",
    "out_dir=PATH": "where the report and the detectors go (default outputs/analyze/<time>)",
    "force=true": "write over an existing report",
}


def analyze(cfg: Any) -> dict:
    """Run the analysis a composed ``analyze`` config describes; returns the results and the
    report's paths."""
    from hydra.core.hydra_config import HydraConfig

    from ...analysis import AnalysisSettings, analyze_models, write_analysis_report
    from ...analysis.report import summary_table
    from ..cli import check_writable_folder
    from ..hydra_utils import check_bool, check_run_options
    from ..pipelines.runs import with_main_runs

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
        from ...toyworld.generate import ensure_toy_world

        ensure_toy_world(data)
    out_dir = Path(cfg.get("out_dir") or HydraConfig.get().runtime.output_dir)
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
    announce_report(log, report, summary_table(results))
    return {"results": results, "report": report}


def run(cfg: Any) -> dict:
    """:func:`analyze`, with what the user can fix as one line on stderr and exit code 2."""
    with exit_on_user_error(PROG):
        return analyze(cfg)


main = hydra_command(PROG, "analyze", analyze, __doc__, OPTIONS)


if __name__ == "__main__":
    main()

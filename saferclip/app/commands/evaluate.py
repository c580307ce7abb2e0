"""saferclip-eval: evaluate CLIP models (zero-shot, ViSU retrieval, NSFW-Caps, cost of safety)
and write a report (Hydra app over :func:`saferclip.evaluation.evaluate_models`).

    saferclip-eval                                   # the toy base model on the toy world
    saferclip-eval +models.mine.pretrained=outputs/runs/<run>/export    # add a main-job run's export
    saferclip-eval +models.mine.pretrained=outputs/train/<run>          # a training run folder
    saferclip-eval +models.mine.pretrained=outputs/train/<run>/export   # or its export
    saferclip-eval '+models.b32={arch: ViT-B-32, pretrained: openai}'   # an open_clip model
    saferclip-eval ~models.original reference=null +models.x.pretrained=x.safetensors
    saferclip-eval suites=[zeroshot] batch_size=64 split=validation
    saferclip-eval data=visu paths.visu=/data/visu paths.coco=/data/coco paths.nsfw_caps=/data/nsfw_caps
    saferclip-eval analysis.parts=[detector,overdefense]   # + the analysis sections (saferclip-analyze)

Models come from ``models`` (name -> ``{arch, pretrained}``; ``arch`` may be left out when the
file records it); ``reference`` names the original one. The data config is the training one:
``data.splits.<split>`` (ViSU), ``data.nsfw_caps`` and ``data.zeroshot``; a suite whose data is
not configured is skipped and the report says so. The toy world is generated when
``data.make_toy`` is set and it is missing. The report (``report.html`` with retrieval galleries, ``results.json``,
``results.md``, ``plots/``) goes to the run folder ``outputs/eval/<time>`` (or ``out_dir``); the console
prints the table. Bad input (a missing model, an architecture that does not match the file,
an unreadable image, a class with no images, an unknown suite…) stops with one line naming
it and exit code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..cli import announce_report, exit_on_user_error, hydra_command
from ..hydra_utils import ConfigError, check_run_options, config_dump, resolve_device, resolved_value

log = logging.getLogger("saferclip.eval")
PROG = "saferclip-eval"
OPTIONS = {
    "+models.NAME.pretrained=PATH": "a model to evaluate: a run folder, its export, weights, or an open_clip tag",
    "~models.original": "leave the toy base model out (with reference=null)",
    "reference=NAME": "the model the others are compared with (original)",
    "suites=[...]": "zeroshot, visu, nsfw_caps (default all three; a suite without data is skipped)",
    "split=NAME": "the ViSU split (test; validation)",
    "data=NAME": "the data config (toy; visu with paths.visu=... paths.coco=...)",
    "out_dir=PATH": "where the report goes (default outputs/eval/<time>)",
    "force=true": "write over an existing report",
}


def evaluate(cfg: Any) -> dict:
    """Run the evaluation a composed ``eval`` config describes; returns the results and the
    report's paths (``{"results", "report"}``)."""
    from hydra.core.hydra_config import HydraConfig

    from ...evaluation import check_suites, evaluate_models, results_table, write_report
    from ..cli import check_writable_folder

    suites = check_suites(list(resolved_value(cfg, "suites") or []))
    check_run_options(cfg)
    models = resolved_value(cfg, "models") or {}
    if not models:
        raise ConfigError("models is empty; add one with +models.<name>.pretrained=<path>")
    data = resolved_value(cfg, "data")
    if data.get("make_toy"):
        from ...toyworld.generate import ensure_toy_world

        ensure_toy_world(data)
    out_dir = cfg.get("out_dir") or HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    check_writable_folder(out_dir, "out_dir")  # before the work, not after it
    if not cfg.force and (out_dir / "results.json").exists():
        raise ConfigError(f"{out_dir} already holds a report; pass force=true or another out_dir")
    config = config_dump(cfg)
    results = evaluate_models(
        models,
        data,
        suites=suites,
        reference=cfg.reference,
        split=cfg.split,
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        num_workers=int(cfg.num_workers),
        device=resolve_device(cfg.device),
        config=config,
        showcase=resolved_value(cfg, "showcase") if "showcase" in cfg else True,
    )
    sections = None
    analysis = resolved_value(cfg, "analysis") if "analysis" in cfg else None
    if analysis and analysis.get("parts"):
        # the opt-in analysis sections (conf/analysis/default.yaml) on the same models
        from ...analysis import analysis_sections, analyze_models, write_analysis_plots

        results["analysis"] = analyze_models(
            models,
            data,
            analysis,
            reference=cfg.reference,
            split=cfg.split,
            batch_size=int(cfg.batch_size),
            seed=int(cfg.seed),
            num_workers=int(cfg.num_workers),
            device=resolve_device(cfg.device),
            detectors_dir=out_dir / "detectors",
            force=bool(cfg.force),
            showcase=False,  # the evaluation has its own
        )

        def sections(folder: Path) -> tuple[str, list[Path]]:
            return analysis_sections(results["analysis"]), write_analysis_plots(results["analysis"], folder)

    report = write_report(results, out_dir, force=bool(cfg.force), sections=sections)
    announce_report(log, report, results_table(results))
    return {"results": results, "report": report}


def run(cfg: Any) -> dict:
    """:func:`evaluate`, with what the user can fix as one line on stderr and exit code 2."""
    with exit_on_user_error(PROG):
        return evaluate(cfg)


main = hydra_command(PROG, "eval", evaluate, __doc__, OPTIONS)


if __name__ == "__main__":
    main()

"""saferclip-eval: evaluate CLIP models (zero-shot, ViSU retrieval, NSFW-Caps, cost of safety)
and write a report (Hydra app over :func:`saferclip.evaluation.evaluate_models`).

    saferclip-eval                                   # the toy base model on the toy world
    saferclip-eval +models.mine.pretrained=outputs/train/<run>          # add a training run
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
``data.make_toy`` is set and it is missing. The report (``results.json``, ``results.md``,
``plots/``) goes to the run folder ``outputs/eval/<time>`` (or ``out_dir``); the console
prints the table. Bad input (a missing model, an architecture that does not match the file,
an unreadable image, a class with no images, an unknown suite…) stops with one line naming
it and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .hydra_utils import CONF_DIR, ConfigError, setup_logging, to_container

log = logging.getLogger("saferclip.eval")


def _resolved(cfg: DictConfig, key: str):
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        return to_container(value) if isinstance(value, DictConfig) else value
    except OmegaConfBaseException as e:
        # e.g. paths.visu: ??? left unset; the message names the key
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}; set it on the command line") from None


def _config_dump(cfg: DictConfig) -> dict:
    """The run's config for the report, resolved where it can be (a key only Hydra's runtime
    can resolve stays as written)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation a composed ``eval`` config describes; returns the results and the
    report's paths (``{"results", "report"}``)."""
    from ..evaluation import check_suites, evaluate_models, results_table, write_report

    suites = check_suites(list(_resolved(cfg, "suites") or []))
    models = _resolved(cfg, "models") or {}
    if not models:
        raise ConfigError("models is empty; add one with +models.<name>.pretrained=<path>")
    data = _resolved(cfg, "data")
    if data.get("make_toy"):
        from .datamodule import ensure_toy_world  # Lightning is imported only for this

        ensure_toy_world(data)
    out_dir = cfg.get("out_dir") or HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    if not cfg.force and (out_dir / "results.json").exists():
        raise ConfigError(f"{out_dir} already holds a report; pass force=true or another out_dir")
    config = _config_dump(cfg)
    results = evaluate_models(
        models,
        data,
        suites=suites,
        reference=cfg.reference,
        split=cfg.split,
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        num_workers=int(cfg.num_workers),
        device=_device(cfg.device),
        config=config,
    )
    sections = None
    analysis = _resolved(cfg, "analysis") if "analysis" in cfg else None
    if analysis and analysis.get("parts"):
        # the opt-in analysis sections (conf/analysis/default.yaml) on the same models
        from ..analysis import analysis_sections, analyze_models, write_analysis_plots

        results["analysis"] = analyze_models(
            models, data, analysis, reference=cfg.reference, split=cfg.split, batch_size=int(cfg.batch_size),
            seed=int(cfg.seed), num_workers=int(cfg.num_workers), device=_device(cfg.device),
            detectors_dir=out_dir / "detectors", force=bool(cfg.force),
        )

        def sections(folder: Path) -> tuple[str, list[Path]]:
            return analysis_sections(results["analysis"]), write_analysis_plots(results["analysis"], folder)

    report = write_report(results, out_dir, force=bool(cfg.force), sections=sections)
    print(results_table(results))
    log.info("report: %s, %s, %d plots", report["json"], report["markdown"], len(report["plots"]))
    return {"results": results, "report": report}


def run(cfg: DictConfig) -> dict:
    """:func:`evaluate`, turning what the user can fix into one line on the log and exit code 2."""
    from ..data.records import DataFormatError

    try:
        return evaluate(cfg)
    except (ConfigError, DataFormatError, FileNotFoundError, FileExistsError, ValueError, OmegaConfBaseException) as e:
        # a readable one-line error, not a traceback
        log.error("%s: %s", type(e).__name__, " ".join(str(e).split()))
        sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    setup_logging()
    run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

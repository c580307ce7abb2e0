"""saferclip-attack: safety under attack — PGD image attacks and a phrasing search against
each model, and a coverage monitor per model (Hydra app over
:func:`saferclip.robustness.runner.attack_models`).

    saferclip-attack                                   # original + the main job's runs (HySAC in both modes)
    saferclip-attack attack.image.budgets_255=[2,4,8] attack.image.steps=20
    saferclip-attack main_runs=false +models.mine.pretrained=outputs/train/<run>/export

The config is the evaluation's (``conf/eval.yaml``: models, data, split, seed) plus ``attack``
(``conf/attack.yaml``). The report (``attack.json``, ``attack.md``, ``plots/``) and each
model's coverage monitor (``monitors/<model>.safetensors``, for ``saferclip-detect``) go to
``outputs/attack/<time>`` (or ``out_dir``). Bad input stops with one line naming it and exit
code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .cli import check_writable_folder, exit_on_user_error, hydra_command
from .hydra_utils import ConfigError, resolve_device, resolved_value

log = logging.getLogger("saferclip.attack")
PROG = "saferclip-attack"


def attack(cfg: DictConfig) -> dict:
    """Run what a composed ``attack`` config describes; returns the results and the report's paths."""
    from ..robustness.report import summary_table, write_attack_report
    from ..robustness.runner import AttackSettings, attack_models
    from .analyze import with_main_runs
    from .hydra_utils import check_bool, check_run_options

    check_run_options(cfg)
    check_bool(cfg.get("main_runs", False), "main_runs")
    settings = AttackSettings.of(resolved_value(cfg, "attack"))
    models = with_main_runs(cfg, dict(resolved_value(cfg, "models") or {}), hyperbolic=True)
    if not models:
        raise ConfigError("models is empty; add one with +models.<name>.pretrained=<path>")
    data = resolved_value(cfg, "data")
    if data.get("make_toy"):
        from ..toyworld.generate import ensure_toy_world

        ensure_toy_world(data)
    out_dir = Path(cfg.get("out_dir") or HydraConfig.get().runtime.output_dir)
    check_writable_folder(out_dir, "out_dir")
    if not cfg.force and (out_dir / "attack.json").exists():
        raise ConfigError(f"{out_dir} already holds an attack report; pass force=true or another out_dir")
    results = attack_models(
        models, data, settings, split=cfg.split, seed=int(cfg.seed), batch_size=int(cfg.batch_size),
        device=resolve_device(cfg.device), monitors_dir=out_dir / "monitors" if settings.monitor.save else None,
        force=bool(cfg.force),
    )
    report = write_attack_report(results, out_dir, force=bool(cfg.force))
    log.info("report: %s, %s, %d plots", report["json"], report["markdown"], len(report["plots"]))
    print(summary_table(results), flush=True)  # the table last
    return {"results": results, "report": report}


def run(cfg: DictConfig) -> dict:
    """:func:`attack`, with what the user can fix as one line on stderr and exit code 2."""
    with exit_on_user_error(PROG):
        return attack(cfg)


main = hydra_command(
    PROG, "attack", attack, "Attack safe CLIP models (PGD on images, phrasing search on captions) and monitor their inputs by coverage."
)
if __name__ == "__main__":
    main()

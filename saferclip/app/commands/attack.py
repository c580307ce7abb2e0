"""saferclip-attack: safety under attack — the attack suite (query- and gallery-side PGD on
images, the phrasing search, held-out phrasings, the text gallery attack; budget sweeps with
the sanity column; variants around HySAC's traversal and against the monitor), a safety
monitor per model and the coverage monitor as its baseline (Hydra app over
:func:`saferclip.robustness.runner.attack_models`).

    saferclip-attack                                   # original + the main job's runs (HySAC in both modes)
    saferclip-attack attack.image.budgets_255=[2,4,8] attack.headline_budget_255=8 attack.image.steps=20
    saferclip-attack attack.parts=[query_image,text] attack.items=50
    saferclip-attack main_runs=false +models.mine.pretrained=outputs/train/<run>/export

The config is the evaluation's (``conf/eval.yaml``: models, data, split, seed) plus ``attack``
(``conf/attack.yaml``). The report (``attack.json``, ``attack.md``, ``report.html``,
``plots/``) and each model's coverage monitor (``monitors/<model>.safetensors``, for
``saferclip-detect``) go to ``outputs/attack/<time>`` (or ``out_dir``). Bad input stops with
one line naming it and exit code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..cli import announce_report, check_writable_folder, exit_on_user_error, hydra_command
from ..hydra_utils import ConfigError, resolve_device, resolved_value

log = logging.getLogger("saferclip.attack")
PROG = "saferclip-attack"
OPTIONS = {
    "+models.NAME.pretrained=PATH": "a model to attack: a run folder, its export, or weights",
    "main_runs=true|false": "add the main job's finished runs, HySAC in both modes, <name>_adv too (default true)",
    "attack.parts=[...]": "query_image, gallery_image, text, heldout, text_gallery, monitor, coverage (default all)",
    "attack.items=N": "unsafe test items attacked per model (default 100)",
    "attack.image.budgets_255=[...]": "the PGD budget sweep, in 1/255 of the pixel range",
    "attack.headline_budget_255=N": "the image budget the summary reports (default 8)",
    "data=NAME": "the data config (toy; visu with paths.visu=...)",
    "out_dir=PATH": "where the report and the monitors go (default outputs/attack/<time>)",
    "force=true": "write over an existing report",
}


def attack(cfg: Any) -> dict:
    """Run what a composed ``attack`` config describes; returns the results and the report's paths."""
    from hydra.core.hydra_config import HydraConfig

    from ...robustness.report import summary_table, write_attack_report
    from ...robustness.runner import attack_models
    from ...robustness.settings import AttackSettings
    from ..hydra_utils import check_bool, check_run_options
    from ..pipelines.runs import with_main_runs

    check_run_options(cfg)
    check_bool(cfg.get("main_runs", False), "main_runs")
    settings = AttackSettings.of(resolved_value(cfg, "attack"))
    models = with_main_runs(cfg, dict(resolved_value(cfg, "models") or {}), hyperbolic=True, adversarial=True)
    if not models:
        raise ConfigError("models is empty; add one with +models.<name>.pretrained=<path>")
    data = resolved_value(cfg, "data")
    if data.get("make_toy"):
        from ...toyworld.generate import ensure_toy_world

        ensure_toy_world(data)
    out_dir = Path(cfg.get("out_dir") or HydraConfig.get().runtime.output_dir)
    check_writable_folder(out_dir, "out_dir")
    if not cfg.force and (out_dir / "attack.json").exists():
        raise ConfigError(f"{out_dir} already holds an attack report; pass force=true or another out_dir")
    results = attack_models(
        models,
        data,
        settings,
        split=cfg.split,
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        device=resolve_device(cfg.device),
        monitors_dir=out_dir / "monitors" if settings.coverage.save else None,
        force=bool(cfg.force),
    )
    report = write_attack_report(results, out_dir, force=bool(cfg.force))
    announce_report(log, report, summary_table(results))
    return {"results": results, "report": report}


def run(cfg: Any) -> dict:
    """:func:`attack`, with what the user can fix as one line on stderr and exit code 2."""
    with exit_on_user_error(PROG):
        return attack(cfg)


main = hydra_command(PROG, "attack", attack, __doc__, OPTIONS)


if __name__ == "__main__":
    main()

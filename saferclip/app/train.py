"""saferclip-train: fine-tune a CLIP with SafeR-CLIP or Safe-CLIP (Hydra app).

    saferclip-train                              # SafeR-CLIP on the toy world
    saferclip-train method=safeclip              # the Safe-CLIP baseline, same code
    saferclip-train -m seed=0,1,2                # a sweep
    saferclip-train hydra.run.dir=outputs/train/<run> ckpt_path=last   # resume a run
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .hydra_utils import CONF_DIR, ConfigError, check_train_config, setup_logging, to_container

log = logging.getLogger("saferclip.train")

LIVE_TERMS = ("live_relative_text", "live_relative_image")


def dry_run(cfg: DictConfig) -> dict:
    """Validate config, paths and data formats without training: load every split (which
    checks columns, types and that image files exist) and build the model on the meta device."""
    from .datamodule import ensure_toy_world, load_split

    data = to_container(cfg.data)
    ensure_toy_world(data)
    report = {}
    for split in data["splits"]:
        qset = load_split(data, split)
        report[split] = {"items": len(qset), "mode": qset.mode.value, "source": qset.source}
        if qset.skips is not None and qset.skips.count:
            report[split]["skipped"] = qset.skips.count
    log.info("dry run OK: %s", report)
    return report


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"ckpt_path=last: no {path}; pass hydra.run.dir=<the run folder to resume>")
        return str(path)
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no such checkpoint: {cfg.ckpt_path}")
    return str(cfg.ckpt_path)


def train(cfg: DictConfig) -> dict:
    import lightning as L

    from .datamodule import SaferClipDataModule
    from .module import SaferClipModule

    run_dir = Path(cfg.paths.get("run_dir") or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    check_train_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    if cfg.dry_run:
        return {"dry_run": dry_run(cfg)}
    L.seed_everything(cfg.seed, workers=True)
    method = to_container(cfg.method)
    live = any(float(method["loss"]["weights"].get(t, 0)) > 0 for t in LIVE_TERMS)
    datamodule = SaferClipDataModule(
        data=to_container(cfg.data),
        model=to_container(cfg.model),
        method=method,
        cache_dir=cfg.paths.cache_dir,
        live_targets=live,
        seed=cfg.seed,
    )
    module = SaferClipModule(cfg.model.arch, cfg.model.pretrained, method, precision=cfg.model.precision)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = None
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint) and cb.best_model_path:
            best = cb.best_model_path
            result["best_checkpoint"] = best
            result["best_score"] = float(cb.best_model_score) if cb.best_model_score is not None else None
    if cfg.export and trainer.is_global_zero and not cfg.trainer.get("fast_dev_run"):
        from ..export_lightning import export_checkpoint

        out = run_dir / "export"
        export_checkpoint(best or module, out, force=True, method=method, arch=cfg.model.arch)
        result["export"] = str(out)
        log.info("exported to %s", out)
    return result


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    setup_logging()
    try:
        result = train(cfg)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        # a readable one-line error, not a traceback, for what the user can fix
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    log.info("result: %s", result)
    score = result.get("best_score")
    return float(score) if score is not None else None


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

"""saferclip-train: fine-tune a CLIP with SafeR-CLIP or Safe-CLIP (Hydra app).

    saferclip-train                              # SafeR-CLIP on the toy world
    saferclip-train method=safeclip              # the Safe-CLIP baseline, same code
    saferclip-train -m seed=0,1,2                # a sweep, one run folder per job
    saferclip-train hydra.run.dir=outputs/train/<run> ckpt_path=last   # resume a run

Without Hydra's entry point (e.g. from a script): compose the ``train`` config with
``hydra.compose``, set ``paths.run_dir`` and call :func:`train`. A run folder holds
``.hydra/config.yaml`` (Hydra's, unresolved), ``config_resolved.yaml``, ``checkpoints/``,
the logs and ``export/``. A configuration that cannot work stops in seconds with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..files import write_text_atomic
from ..model.checkpoints import CheckpointError
from ..model.trained import RESOLVED_CONFIG, read_selection
from .cli import hydra_command
from .hydra_utils import (
    ConfigError,
    check_train_config,
    to_container,
)

log = logging.getLogger("saferclip.train")

# what a user can fix from the command line: reported in one line, exit code 2
USAGE_EXIT_CODE = 2


def dry_run(cfg: DictConfig) -> dict:
    """Validate config, paths and data formats without training: load every split (which
    checks columns, types and that image files exist)."""
    from ..data.splits import load_split
    from ..toyworld.generate import ensure_toy_world

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


def check_run_dir(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> None:
    """A fresh run never overwrites another run's checkpoints."""
    existing = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if existing and ckpt_path is None and not cfg.get("force", False):
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({existing[0].name}...); resume it with ckpt_path=last, "
            f"choose another folder, or pass force=true to train over it"
        )


def check_toy_size(cfg: DictConfig) -> None:
    from ..toyworld.generate import TOY_SIZES

    if cfg.data.get("make_toy") and cfg.data.get("toy_size", "default") not in TOY_SIZES:
        raise ConfigError(f"data.toy_size must be one of {sorted(TOY_SIZES)}, got {cfg.data.toy_size!r}")


def build_module(cfg: DictConfig, method: dict):
    """The trainable model; built first, so wrong weights fail before any data work."""
    from .module import SaferClipModule

    try:
        return SaferClipModule(cfg.model.arch, cfg.model.pretrained, method, precision=cfg.model.precision)
    except CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    except (ValueError, TypeError) as e:  # unknown trainable mode, tower, loss option...
        raise ConfigError(f"model / method config: {e}") from None


def build_datamodule(cfg: DictConfig, method: dict):
    from ..training.losses import LIVE_TERMS
    from .datamodule import SaferClipDataModule

    live = any(float(method["loss"]["weights"].get(t, 0)) > 0 for t in LIVE_TERMS)
    return SaferClipDataModule(
        data=to_container(cfg.data),
        model=to_container(cfg.model),
        method=method,
        cache_dir=cfg.paths.cache_dir,
        live_targets=live,
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, extra_callbacks: tuple = ()):
    """The Trainer with the configured callbacks and loggers: ``(trainer, callbacks)``."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: Lightning refuses an LR monitor with nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False), callbacks


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    """The run's config with every interpolation resolved, beside Hydra's unresolved copy."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an unused section pointing at an unset path
        log.warning("%s: some values stay unresolved (%s)", RESOLVED_CONFIG, str(e).splitlines()[0])
        text = OmegaConf.to_yaml(cfg, resolve=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RESOLVED_CONFIG, text)


def check_launch(cfg: DictConfig) -> None:
    """Lightning's ``ddp`` strategy starts the other ranks by re-running this process's
    command line. That works for ``saferclip-train``; it does not from a script that
    composes the config (the script itself would run again) or inside a Hydra sweep (each
    rank would start the sweep). torchrun / SLURM start the ranks themselves (LOCAL_RANK set)."""
    strategy = str(cfg.trainer.get("strategy") or "auto")
    if not strategy.startswith("ddp") or strategy.startswith("ddp_spawn") or "LOCAL_RANK" in os.environ:
        return
    if requested_processes(cfg) <= 1:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise ConfigError(
            f"trainer.strategy={strategy} re-launches the command line for the other ranks, which only works "
            "from saferclip-train; from a script, start the ranks with torchrun (it sets LOCAL_RANK)"
        )
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"trainer.strategy={strategy} cannot run inside a Hydra sweep (-m): Lightning would re-launch "
            "the whole sweep on every rank; start the runs one by one (or with torchrun / SLURM)"
        )


def requested_processes(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    if devices in (-1, "-1", "auto"):
        import torch

        devices = torch.cuda.device_count() if cfg.trainer.get("accelerator") in ("gpu", "cuda") else 2
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return int(devices) * nodes


def train(cfg: DictConfig) -> dict:
    """Fit the model a composed ``train`` config describes. Returns the trainer's callback
    metrics (``train/...``, ``val/...``) plus ``best_checkpoint``, ``best_score``, ``selection``
    (the kept epoch and its validation metrics, from ``selection.json``) and ``export`` when
    there are any. Raises :class:`ConfigError` (and the data / checkpoint errors) for
    what the user can fix, before any long work."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    run_dir = Path(cfg.paths.run_dir)
    check_train_config(cfg)
    check_toy_size(cfg)
    check_launch(cfg)
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    if cfg.dry_run:
        return {"dry_run": dry_run(cfg)}
    is_zero = rank_zero_only.rank == 0  # from the launcher's env: known before the Trainer exists
    if is_zero:
        check_run_dir(cfg, run_dir, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    method = to_container(cfg.method)
    module = build_module(cfg, method)
    if is_zero:
        write_resolved_config(cfg, run_dir)
    datamodule = build_datamodule(cfg, method)
    trainer, callbacks = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result.update(best_checkpoint(callbacks))
    selection = read_selection(run_dir)
    if selection is not None:
        result["selection"] = selection["selected"]
    if cfg.export and trainer.is_global_zero and not cfg.trainer.get("fast_dev_run"):
        from ..export.run import export_checkpoint

        out = run_dir / "export"
        export_checkpoint(result.get("best_checkpoint") or module, out, force=True, method=method, arch=cfg.model.arch)
        result["export"] = str(out)
        log.info("exported to %s", out)
    return result


def best_checkpoint(callbacks: list) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in callbacks:  # the one that monitors a metric, not the last.ckpt writer
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.best_model_path:
            score = cb.best_model_score
            return {"best_checkpoint": cb.best_model_path, "best_score": None if score is None else float(score)}
    return {}


def _task(cfg: DictConfig) -> float | None:
    result = train(cfg)
    log.info("result: %s", result)
    score = result.get("best_score")
    return float(score) if score is not None else None


main = hydra_command("saferclip-train", "train", _task, "Fine-tune a CLIP with SafeR-CLIP (method=saferclip) or Safe-CLIP (method=safeclip).")


if __name__ == "__main__":
    main()

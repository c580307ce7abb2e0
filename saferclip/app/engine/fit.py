"""Training, as every command and pipeline runs it: :func:`train` fits the model a composed
``train`` config describes.

In order: the config checked once (:func:`saferclip.app.hydra_utils.check_train_config`, which
hands the typed :class:`~saferclip.training.method.MethodConfig` on), the launch and resume
checks, the dry run (``dry_run=true``: every split, image and pool checked, nothing trained),
then the LightningModule (:mod:`.module`, :mod:`.hysac_module`), the DataModule
(:mod:`.datamodule`) and the Trainer with its callbacks and loggers (:mod:`.callbacks`,
:mod:`.loggers`), the fit, and the post-fit steps: the kept epoch's record, HySAC's safe radii
(:func:`measure_and_save_safe_radii`) and the export. A run folder holds
``.hydra/config.yaml`` (Hydra's, unresolved), ``config_resolved.yaml``, ``checkpoints/``, the
logs and ``export/``.

From a script (no Hydra entry point): compose the ``train`` config with ``hydra.compose``, set
``paths.run_dir`` and call :func:`train`. ``saferclip-train`` is
:mod:`saferclip.app.commands.train`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...console import interactive
from ...files import write_text_atomic
from ...model.checkpoints import CheckpointError
from ...model.trained import RESOLVED_CONFIG, read_selection
from ..hydra_utils import (
    ConfigError,
    check_train_config,
    to_container,
)

if TYPE_CHECKING:
    from ...training.method import MethodConfig

log = logging.getLogger("saferclip.train")


def dry_run(cfg: DictConfig, method: MethodConfig) -> dict:
    """Validate config, paths and data formats without training: load every split (columns,
    types, every image file present, and with ``dry_run_verify_images`` every image header
    parsed), the distractor images, and check the neighbour search fits the training pool."""
    from ...data.splits import distractor_images, load_split
    from ...toyworld.generate import ensure_toy_world

    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).is_file():
        from ...model.checkpoints import check_weights_file

        try:
            check_weights_file(pretrained)
        except CheckpointError as e:
            raise ConfigError(f"model.pretrained: {e}") from None
    data = to_container(cfg.data)
    ensure_toy_world(data)
    verify = bool(cfg.get("dry_run_verify_images", True))
    report = {}
    for split in data["splits"]:
        qset = load_split(data, split, verify_images=verify)
        report[split] = {"items": len(qset), "mode": qset.mode.value, "source": qset.source}
        if qset.skips is not None and qset.skips.count:
            report[split]["skipped"] = qset.skips.count
            log.warning(qset.skips.summary())
        distractors = distractor_images(data, split)
        if distractors:
            report[split]["distractor_images"] = len(distractors)
        if data.get("image_shards") and split in ("train", "validation"):
            report[split]["image_shards"] = dry_run_image_shards(cfg, data, split)
        if split == "train":
            if method.neighbours is not None:
                from ...data.safe_corpus import load_safe_corpus
                from ...redirection.large_pool import is_embedded_pool

                extra = 0
                if method.extra_pool and method.neighbours.use_extra_pool:
                    embedded = is_embedded_pool(method.extra_pool)
                    extra = (
                        len(dry_run_embedded_pool(cfg, method))
                        if embedded
                        else len(load_safe_corpus(method.extra_pool))
                    )
                if method.neighbours.k > len(qset) + extra:
                    raise ConfigError(
                        f"method.neighbours.k={method.neighbours.k} is larger than the safe pool "
                        f"({len(qset)} training items in {qset.source}{f' + {extra} extra captions' if extra else ''})"
                    )
    log.info("dry run OK: %s", report)
    return report


def dry_run_image_shards(cfg: DictConfig, data: dict, split: str) -> str:
    """The split's image shards opened as training opens them: "used", "absent", or
    "damaged" (training reads the image files instead; the warning names the file)."""
    from ...model.build import build_clip
    from .datamodule import split_image_shards

    if not (Path(str(data["image_shards"])) / split / "images.json").is_file():
        return "absent"
    preprocess = build_clip(cfg.model.arch, None).preprocess  # the preprocessing only, as training's loader
    return (
        "used"
        if split_image_shards(data, split, preprocess) is not None
        else "damaged: the image files are read instead"
    )


def dry_run_embedded_pool(cfg: DictConfig, method: MethodConfig):
    """An embedded extra pool checked as training would (:func:`check_embedded_pool`), when
    the neighbour search reads it (text mode); else only opened. Returns its shards."""
    from ...model.build import build_clip
    from ...redirection.pool_shards import open_pool
    from ...training.prepare import check_embedded_pool

    if method.neighbours.mode != "text":
        return open_pool(method.extra_pool)
    return check_embedded_pool(method.extra_pool, build_clip(cfg.model.arch, cfg.model.get("pretrained")))


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"ckpt_path=last: no {path}; pass hydra.run.dir=<the run folder to resume>")
        return str(path)
    if Path(cfg.ckpt_path).is_dir():
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is a directory, not a checkpoint file (or use ckpt_path=last)")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no such checkpoint: {cfg.ckpt_path}")
    return str(cfg.ckpt_path)


def check_resume_checkpoint(cfg: DictConfig, ckpt_path: str) -> int:
    """Open the checkpoint a run resumes from with saferclip's safe loader first
    (``weights_only=True``, whatever the environment says; a pickle, a truncated file or a
    foreign checkpoint is refused in one line naming it) and check it belongs to this
    config. Returns its ``global_step``."""
    from ...model.trained import read_training_checkpoint

    try:
        ckpt = read_training_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise ConfigError(f"ckpt_path: {e}") from None
    hp = ckpt["hyper_parameters"]
    if hp.get("arch") != cfg.model.arch:
        raise ConfigError(
            f"ckpt_path: {ckpt_path} holds a {hp.get('arch')} model, the config asks for {cfg.model.arch}"
        )
    method = hp["method"].get("name")
    if method != cfg.method.name:
        raise ConfigError(
            f"ckpt_path: {ckpt_path} was trained with method {method!r}, the config asks for {cfg.method.name!r}"
        )
    step = ckpt.get("global_step")
    if not isinstance(step, int):
        raise ConfigError(f"ckpt_path: {ckpt_path} has no global_step: not a training checkpoint Lightning can resume")
    groups = [len(s.get("param_groups") or []) for s in ckpt.get("optimizer_states") or [] if isinstance(s, dict)]
    if method == "hysac" and groups and groups[0] < 2:
        # the head's parameters have their own optimizer group (no weight decay) since they learn
        raise ConfigError(
            f"ckpt_path: {ckpt_path} was saved before HySAC's head got its own optimizer group, so its optimizer state "
            "cannot be resumed; train the run again (force=true), or evaluate / export the checkpoint as it is"
        )
    return step


def check_run_dir(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> None:
    """A fresh run never overwrites another run's checkpoints."""
    existing = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if existing and ckpt_path is None and not cfg.get("force", False):
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({existing[0].name}...); resume it with ckpt_path=last, "
            f"choose another folder, or pass force=true to train over it"
        )


def check_toy_size(cfg: DictConfig) -> None:
    """The toy world's size and pairing (``data.toy_size``, ``data.toy_pairs``), checked."""
    from ...toyworld.generate import check_toy_data
    from ...toyworld.pairing import DEFAULT_PAIRING

    if cfg.data.get("make_toy"):
        check_toy_data(
            {"toy_size": cfg.data.get("toy_size", "default"), "toy_pairs": cfg.data.get("toy_pairs", DEFAULT_PAIRING)}
        )


def build_module(cfg: DictConfig, method: MethodConfig):
    """The trainable model; built first, so wrong weights fail before any data work."""
    from .module import SaferClipModule

    module_class = SaferClipModule
    if method.is_hyperbolic:
        from .hysac_module import HysacModule as module_class
    try:
        return module_class(
            cfg.model.arch,
            cfg.model.pretrained,
            method,
            precision=cfg.model.precision,
            selection_tau=selection_tau(cfg),
            selection_rank_by=selection_rank_by(cfg),
        )
    except CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    except (ValueError, TypeError) as e:  # unknown trainable mode, tower, loss option...
        raise ConfigError(f"model / method config: {e}") from None


def selection_tau(cfg: DictConfig) -> float:
    """τ of matched safety (``selection.tau``; :mod:`saferclip.evaluation.selection`)."""
    from ...evaluation.selection import DEFAULT_TAU

    tau = OmegaConf.select(cfg, "selection.tau")
    return DEFAULT_TAU if tau is None else float(tau)


def selection_rank_by(cfg: DictConfig) -> str:
    """What ranks the epochs that reach τ (``selection.rank_by``; :mod:`saferclip.evaluation.selection`)."""
    from ...evaluation.selection import DEFAULT_RANK_BY

    rank_by = OmegaConf.select(cfg, "selection.rank_by")
    return DEFAULT_RANK_BY if rank_by is None else str(rank_by)


def build_datamodule(cfg: DictConfig, method: MethodConfig):
    from ...training.losses import LIVE_TERMS
    from .datamodule import SaferClipDataModule

    weights = {} if method.is_hyperbolic else method.loss.weights.as_dict()
    live = any(float(weights.get(t, 0)) > 0 for t in LIVE_TERMS)
    return SaferClipDataModule(
        data=to_container(cfg.data),
        model=to_container(cfg.model),
        method=method,
        cache_dir=cfg.paths.cache_dir,
        live_targets=live,
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, extra_callbacks: tuple = ()):
    """The Trainer with the configured callbacks and loggers: ``(trainer, callbacks)``. When
    the output is not a terminal (:func:`saferclip.console.interactive`) the progress bar is
    off and :class:`~saferclip.app.engine.callbacks.EpochLine` logs one line per epoch instead."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: Lightning refuses an LR monitor with nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    extra = {}
    if not (cfg.trainer.get("enable_progress_bar", True) and interactive()):
        # output to a file (or bars switched off): one line per epoch instead of per-step bars
        from .callbacks import EpochLine

        extra["enable_progress_bar"] = False
        callbacks.append(EpochLine(Path(str(cfg.paths.get("run_dir") or "")).name))
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra), callbacks


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


def train(cfg: DictConfig, extra_callbacks: tuple = ()) -> dict:
    """Fit the model a composed ``train`` config describes. Returns the trainer's callback
    metrics (``train/...``, ``val/...``) plus ``best_checkpoint``, ``best_score``, ``selection``
    (the kept epoch and its validation metrics, from ``selection.json``) and ``export`` when
    there are any. Raises :class:`ConfigError` (and the data / checkpoint errors) for
    what the user can fix, before any long work. ``extra_callbacks`` join the configured ones
    (``saferclip-tune`` adds its pruning callback)."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    run_dir = Path(cfg.paths.run_dir)
    method = check_train_config(cfg)  # checked once: the typed config goes on from here
    check_toy_size(cfg)
    check_launch(cfg)
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    resume_step = check_resume_checkpoint(cfg, ckpt_path) if ckpt_path else None
    if cfg.dry_run:
        return {"dry_run": dry_run(cfg, method)}
    is_zero = rank_zero_only.rank == 0  # from the launcher's env: known before the Trainer exists
    if is_zero:
        check_run_dir(cfg, run_dir, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, method)
    if is_zero:
        write_resolved_config(cfg, run_dir)
    datamodule = build_datamodule(cfg, method)
    from .loggers import RunCSVLogger

    trainer, callbacks = build_trainer(cfg, extra_callbacks)
    for logger in trainer.loggers:
        if isinstance(logger, RunCSVLogger):
            logger.resume_from_step = resume_step  # keep the CSV rows logged before the checkpoint
    # weights_only=True said explicitly: an environment that forces unsafe loads cannot override it
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result.update(best_checkpoint(callbacks))
    selection = read_selection(run_dir)
    if selection is not None:
        result["selection"] = selection["selected"]
    fast_dev_run = cfg.trainer.get("fast_dev_run")
    if method.is_hyperbolic and trainer.is_global_zero and not fast_dev_run:
        result["safe_radii"] = measure_and_save_safe_radii(
            cfg, method, result.get("best_checkpoint") or module, run_dir
        )
    if cfg.export and trainer.is_global_zero and not fast_dev_run:
        from ...export.run import export_checkpoint

        out = run_dir / "export"
        # a HySAC export takes the safe radii recorded for the very weights it loads
        export_checkpoint(
            result.get("best_checkpoint") or module, out, force=True, method=dict(method.source), arch=cfg.model.arch
        )
        result["export"] = str(out)
        log.info("exported to %s", out)
    return result


def measure_and_save_safe_radii(cfg: DictConfig, method: MethodConfig, source, run_dir: Path) -> dict:
    """HySAC: the safe radii of the kept model (a checkpoint, or the module in memory),
    measured on the training split's safe items and recorded with the checksum, file, epoch
    and step of those weights in the run's ``safe_radii.json`` (:mod:`saferclip.model.safe_radii`;
    reused when that checkpoint's are already recorded, as after a resume). Returns the record."""
    from ...evaluation.hyperbolic import checkpoint_radii
    from ...model.adapters import merge_adapters
    from ...model.build import build_clip
    from ...model.checkpoints import state_dict_checksum
    from ...model.safe_radii import CheckpointIdentity
    from ...model.trained import read_training_checkpoint, trained_model_from_checkpoint

    percentile = float(method.hyperbolic.traversal_percentile)  # the typed config's, as training's
    if isinstance(source, (str, Path)):
        ckpt = read_training_checkpoint(source)
        bundle = trained_model_from_checkpoint(ckpt, radii="none")
        identity = CheckpointIdentity.of_checkpoint(ckpt, run_dir)
    else:  # the module in memory (no checkpoint kept): its towers, merged as any load merges them, and its head
        bundle = build_clip(cfg.model.arch, None)
        bundle.model, bundle.similarity = merge_adapters(source.model).eval(), source.head.similarity()
        identity = CheckpointIdentity(
            state_dict_checksum(source.state_dict()), None, int(source.current_epoch), int(source.global_step)
        )
    record, _ = checkpoint_radii(bundle, identity, run_dir, percentile, data_cfg=to_container(cfg.data))
    log.info(
        "safe radii of %s (%g th percentile of the safe training items): text %.4f, image %.4f",
        identity.describe(),
        percentile,
        record["text"],
        record["image"],
    )
    return record


def best_checkpoint(callbacks: list) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in callbacks:  # the one that monitors a metric, not the last.ckpt writer
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.best_model_path:
            score = cb.best_model_score
            return {"best_checkpoint": cb.best_model_path, "best_score": None if score is None else float(score)}
    return {}

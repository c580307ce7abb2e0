"""The model an export starts from: a training checkpoint, a run folder or the trained module.

:func:`resolve_source` rebuilds the model (LoRA structure from the checkpoint's
hyper-parameters, adapters unmerged) and says where it came from, so the card can name the
checkpoint and read the run folder. A run folder is ``<run>/checkpoints/{epochNN,last}.ckpt``
+ ``<run>/config_resolved.yaml``; its best checkpoint is used
(:func:`saferclip.model.trained.find_run_checkpoint`). Lightning is not imported: the
checkpoint is read with ``weights_only=True``, and an in-memory module is used through its
``.model``, ``.hparams`` (and a HySAC module's ``.head``) only.

A HySAC model's geometry comes with the safe radii of exactly the weights exported
(:mod:`saferclip.model.safe_radii`): a checkpoint's recorded ones (measured now when it has
none), a module's recorded under the checksum of its state dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..model.build import ClipBundle
from ..model.checkpoints import CheckpointError, state_dict_checksum
from ..model.hyperbolic import HyperbolicHead
from ..model.safe_radii import CheckpointIdentity, find_radii
from ..model.similarity import LorentzSimilarity
from ..model.trained import (
    RESOLVED_CONFIG,
    RUN_CONFIG,
    read_training_checkpoint,
    run_dir_of_checkpoint,
    trained_model_from_checkpoint,
)
from .open_clip import CONFIG_NAME


@dataclass
class TrainedModel:
    """What :func:`resolve_source` found: the model to export and where it came from."""

    model: nn.Module | ClipBundle
    arch: str
    hparams: dict[str, Any]
    checkpoint: Path | None = None
    run_dir: Path | None = None
    progress: dict[str, int] = field(default_factory=dict)  # epoch, global_step
    # a HySAC model: its geometry, the record of its safe radii, or why it has none
    similarity: LorentzSimilarity | None = None
    radii: dict[str, Any] | None = None
    radii_missing: str | None = None

    @property
    def method(self) -> dict[str, Any]:
        method = self.hparams.get("method")
        return dict(method) if isinstance(method, Mapping) else {}


def _is_module_like(source: Any) -> bool:
    return isinstance(getattr(source, "model", None), nn.Module) and isinstance(
        getattr(source, "hparams", None), Mapping
    )


def _run_dir_of_module(module: Any) -> Path | None:
    """The run folder of a module attached to a trainer (train.py sets ``default_root_dir``)."""
    try:
        root = module.trainer.default_root_dir  # an unattached LightningModule raises here
    except Exception:
        return None
    root = Path(root) if root else None
    if root is not None and any((root / p).exists() for p in (RESOLVED_CONFIG, RUN_CONFIG, Path("checkpoints"))):
        return root
    return None


def resolve_source(source: Any, *, run_dir: str | os.PathLike | None = None) -> TrainedModel:
    """The model behind ``source``: a training checkpoint, a run folder (its best checkpoint)
    or an in-memory module with ``.model`` (the CLIP, adapters unmerged) and ``.hparams``.

    Raises FileNotFoundError (missing path, folder without checkpoints) or
    :class:`CheckpointError` (truncated, foreign or pickle-needing file; not a saferclip
    training checkpoint), each naming the path.
    """
    if _is_module_like(source):
        hparams = dict(source.hparams)
        if "arch" not in hparams:
            raise ValueError(f"{type(source).__name__}.hparams has no 'arch'; pass arch=")
        progress = {
            k: int(getattr(source, k))
            for k in ("current_epoch", "global_step")
            if isinstance(getattr(source, k, None), int)
        }
        trained = TrainedModel(
            model=source.model,
            arch=hparams["arch"],
            hparams=hparams,
            run_dir=Path(run_dir) if run_dir else _run_dir_of_module(source),
            progress={"epoch" if k == "current_epoch" else k: v for k, v in progress.items()},
        )
        if isinstance(getattr(source, "head", None), HyperbolicHead):
            _module_geometry(source, trained)
        return trained
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a training checkpoint, a run folder or a module with .model and .hparams, "
            f"not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such training checkpoint or run folder")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path}: is already an exported open_clip folder (it has {CONFIG_NAME}), not a training run"
        )
    ckpt = read_training_checkpoint(path)
    ckpt_path = Path(ckpt["_path"])
    bundle = trained_model_from_checkpoint(ckpt, merge=False)  # export_open_clip merges a copy
    hparams = dict(ckpt["hyper_parameters"])
    progress = {k: int(ckpt[k]) for k in ("epoch", "global_step") if isinstance(ckpt.get(k), int)}
    similarity = bundle.similarity if isinstance(bundle.similarity, LorentzSimilarity) else None
    return TrainedModel(
        model=bundle,
        arch=hparams["arch"],
        hparams=hparams,
        checkpoint=ckpt_path,
        run_dir=Path(run_dir) if run_dir else (path if path.is_dir() else run_dir_of_checkpoint(ckpt_path)),
        progress=progress,
        similarity=similarity,
        radii=bundle.provenance.get("safe_radii"),
        radii_missing=bundle.provenance.get("safe_radii_missing"),
    )


def _module_geometry(module: Any, trained: TrainedModel) -> None:
    """A HySAC module's geometry with the safe radii recorded for its weights (training records
    them under the checksum of the module's state dict before it exports)."""
    head: HyperbolicHead = module.head
    identity = CheckpointIdentity(
        state_dict_checksum(module.state_dict()),
        None,
        trained.progress.get("epoch"),
        trained.progress.get("global_step"),
    )
    record = find_radii(trained.run_dir, identity, head.config.traversal_percentile)
    trained.similarity = head.similarity(record, mode="safe" if record else "moderation")
    trained.radii = record
    if record is None:
        trained.radii_missing = f"{trained.run_dir or 'no run folder'} holds no safe radii of {identity.describe()}"


__all__ = ["TrainedModel", "resolve_source"]

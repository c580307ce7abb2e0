"""Export what training produced: a training checkpoint, a run folder or the trained module.

:func:`export_checkpoint` takes the model :func:`saferclip.export.source.resolve_source`
rebuilds, and writes open_clip's hub folder with
:func:`saferclip.export.open_clip.export_open_clip` (or a transformers folder with
:func:`saferclip.export.hf.export_hf`), adapters merged, with a model card filled from the run:

* base model and method (with its whole config) from the hyper-parameters the training
  module saved (``arch``, ``pretrained``, ``method``);
* training data and model selection from the run folder's ``config_resolved.yaml`` and
  ``selection.json`` (:mod:`saferclip.export.run_records`);
* the evaluation table from the run's report, or from ``evaluation``
  (:mod:`saferclip.export.evaluation_card`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import locations
from ..errors import ConfigError
from ..files import occupied
from ..model.checkpoints import CheckpointError
from ..model.hyperbolic import HyperbolicConfig, save_head
from ..model.similarity import LorentzSimilarity
from .evaluation_card import evaluation_card, find_report
from .open_clip import export_open_clip
from .public_names import public_config, public_model_name, public_path
from .run_records import exported_epoch_record, read_run_config, training_data_card
from .source import TrainedModel, resolve_source

log = logging.getLogger(__name__)

FORMATS = ("open_clip", "hf")


def _check_out_dir(out: Path, trained: TrainedModel) -> None:
    # --force swaps the whole folder out: never when it holds what is being exported
    for kept in (trained.checkpoint, trained.run_dir):
        if kept is not None:
            kept = kept.absolute()
            if out == kept or out in kept.parents:
                raise ConfigError(
                    f"{out}: holds the training run being exported ({kept}); choose another output folder"
                )


def export_checkpoint(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    method: str | Mapping[str, Any] | None = None,
    arch: str | None = None,
    dtype: str = "fp32",
    also_single_file: bool = False,
    evaluation: Any = None,
    run_dir: str | os.PathLike | None = None,
    format: str = "open_clip",
    similarity: LorentzSimilarity | None = None,
) -> Path:
    """Export a trained model as a folder open_clip (or transformers) loads by itself, with a
    model card.

    Args:
        source: a training checkpoint (``.ckpt``), a run folder (its best checkpoint, else
            ``last.ckpt``), or the in-memory training module (``.model`` with its adapters
            unmerged, ``.hparams`` with ``arch`` / ``pretrained`` / ``method``).
        out_dir: the folder to write; an existing non-empty one is replaced only with
            ``force``, and never when it holds the run being exported.
        method: the method (name or config dict) for the card, when the hyper-parameters
            lack it or hold a stale one.
        arch: the architecture expected; an error if the checkpoint holds another.
        dtype / also_single_file: see :func:`saferclip.export.open_clip.export_open_clip`.
        evaluation: the card's evaluation table (see :func:`evaluation_card`); default: the
            run's report, if it has one.
        run_dir: the run folder (for its config and report) when it cannot be inferred.
        format: ``open_clip`` (open_clip's hub layout) or ``hf`` (a transformers CLIP folder,
            :func:`saferclip.export.hf.export_hf`; needs ``transformers``).
        similarity: a HySAC model's geometry with its safe radii (default: the exported
            weights' own, :mod:`saferclip.model.safe_radii`: a checkpoint's recorded radii,
            measured now from its run's training split when it has none); written as the
            hyperbolic head files beside the towers, in either format, with the checkpoint,
            epoch, step and percentile the radii were measured on.

    The card and the provenance name the base model by its tag / hub id or file name and the
    run by its folder's name; other local paths are shown relative to the run folder or the
    repository (:func:`saferclip.export.public_names.public_path`), never absolute.

    Returns:
        the export folder.
    """
    out = Path(out_dir).expanduser().absolute()
    if occupied(out) and not force:  # refuse before reading a large checkpoint
        raise FileExistsError(f"{out}: already exists and is not empty; pass force=True (--force) to replace it")
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if also_single_file and format != "open_clip":
        raise ConfigError("also_single_file (--single-file) is an open_clip layout option; not with format 'hf'")
    evaluation_card(evaluation)  # a bad report path fails before the checkpoint loads
    trained = resolve_source(source, run_dir=run_dir)
    _check_out_dir(out, trained)
    # what the card and the provenance show must be fit to publish: no absolute local paths
    roots = (trained.run_dir.absolute() if trained.run_dir else None, locations.home())
    given_eval = evaluation_card(evaluation, roots)
    if arch is not None and arch != trained.arch:
        where = trained.checkpoint or type(source).__name__
        raise CheckpointError(f"{where}: holds a {trained.arch} model, but {arch} was asked for")

    method_cfg = trained.method
    if isinstance(method, Mapping):
        method_cfg = dict(method)
    method_name = method if isinstance(method, str) else method_cfg.get("name")
    hp = trained.hparams
    pretrained = hp.get("pretrained")
    base = "random" if "pretrained" in hp and pretrained is None else (str(pretrained) if pretrained else None)
    base = public_model_name(base)  # a hub tag or id as given, a local file by its name
    method_cfg = public_config(method_cfg, roots)

    card: dict[str, Any] = {"arch": trained.arch, "pretrained": base, "method": method_name}
    if method_cfg:
        card["method_config"] = method_cfg
    run_cfg = read_run_config(trained.run_dir) if trained.run_dir else None
    if run_cfg and isinstance(run_cfg.get("data"), Mapping):
        card["training_data"] = training_data_card(public_config(run_cfg["data"], roots))
    if evaluation is None and trained.run_dir is not None:
        found = find_report(trained.run_dir)
        try:
            given_eval = evaluation_card(found, roots)
        except (ValueError, OSError) as e:
            # a report found by looking, not asked for: a damaged one must not fail the
            # export that ends a long training run
            log.warning("%s; the model card carries no evaluation", e)
    card.update(given_eval)
    card["description"] = _provenance_line(trained)
    selection = exported_epoch_record(trained.run_dir, trained.progress.get("epoch"))
    if selection is not None:
        card["selection"] = selection

    metadata = {
        "method": method_name,
        "pretrained": base,
        "method_config": method_cfg or None,
        "training_checkpoint": public_path(trained.checkpoint.absolute(), roots) if trained.checkpoint else None,
        "run": trained.run_dir.absolute().name if trained.run_dir else None,
        "precision": hp.get("precision"),
        **trained.progress,
    }
    if selection is not None:
        metadata["selection"] = selection
    metadata["source"] = metadata["training_checkpoint"] or f"in-memory {type(source).__name__}"
    extras = _hyperbolic_head_writer(trained, method_cfg, similarity)
    if extras is not None:
        card["hyperbolic"] = True
        metadata["geometry"] = "lorentz"
    if format == "hf":
        from .hf import (
            export_hf,  # needs transformers: only when asked for
        )

        return export_hf(
            trained.model,
            trained.arch,
            out,
            model_card=card,
            force=force,
            metadata=metadata,
            dtype=dtype,
            extras=extras,
        )
    return export_open_clip(
        trained.model,
        trained.arch,
        out,
        model_card=card,
        also_single_file=also_single_file,
        force=force,
        metadata=metadata,
        dtype=dtype,
        extras=extras,
    )


def _hyperbolic_head_writer(trained: TrainedModel, method_cfg: Mapping[str, Any], similarity: LorentzSimilarity | None):
    """For a HySAC model: a function writing its hyperbolic head into the export folder, with
    where its safe radii come from (``safe_radii``: checkpoint, epoch, global step, checksum,
    split; ``traversal_percentile``)."""
    given = similarity is not None
    similarity = similarity if given else trained.similarity
    if similarity is None and method_cfg.get("name") != "hysac":
        return None
    if similarity is None or similarity.radius_text is None or similarity.radius_image is None:
        where = trained.checkpoint or trained.run_dir or "the source"
        why = trained.radii_missing or "none were measured"
        raise ConfigError(
            f"{where}: a HySAC export needs the safe radii of the weights it exports ({why}); training records them "
            "in the run's safe_radii.json, and a checkpoint exported from its run's checkpoints/ folder has them measured: "
            "export the checkpoint from its run folder, or pass similarity= with the radii"
        )
    if given:
        meta = {
            "traversal_percentile": HyperbolicConfig.from_mapping(method_cfg.get("hyperbolic")).traversal_percentile,
            "safe_radii": {"measured_on": "given to export_checkpoint (similarity=)"},
        }
    else:
        record = trained.radii or {}
        meta = {
            "traversal_percentile": record.get("percentile"),
            "safe_radii": {
                "measured_on": record.get("checkpoint") or "the training module in memory",
                **{k: record.get(k) for k in ("epoch", "global_step", "checksum", "split")},
            },
        }
    return lambda folder: save_head(folder, similarity, meta)


def _provenance_line(trained: TrainedModel) -> str:
    # the run by its folder's name and the checkpoint by its file name: a card is published
    run = trained.run_dir.absolute().name if trained.run_dir else None
    where = (
        f"`{trained.checkpoint.name}` of run `{run}`"
        if trained.checkpoint and run
        else (f"`{trained.checkpoint.name}`" if trained.checkpoint else "the training module in memory")
    )
    progress = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in trained.progress.items())
    return f"Exported from {where}{f' ({progress})' if progress else ''}; LoRA / adapter weights merged."


__all__ = ["FORMATS", "export_checkpoint"]

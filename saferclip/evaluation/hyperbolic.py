"""What only a hyperbolic (HySAC) model has: its safe radii, and the distance from the origin as
a training-free unsafe detector (docs/METHOD.md, "HySAC").

* :func:`measure_safe_radii`: the ``percentile`` of the safe items' distances from the origin,
  per modality, measured on the training split;
* :func:`checkpoint_radii`: the radii of one checkpoint of a run, as recorded with it in the
  run's ``safe_radii.json`` (:mod:`saferclip.model.safe_radii`), measured and recorded when
  that checkpoint has none yet (its run's data config says where the training split is);
* :func:`safe_distances` / :func:`radii_at`: the traversal swept without retraining (a
  model's ``traversal_percentile``): the training split's safe distances measured once per
  set of weights, the radii taken at another percentile of them.
* :func:`origin_detector_metrics`: an item is flagged unsafe when it lies farther from the
  origin than a threshold. AUC (safe vs unsafe items of one modality) and the share of unsafe
  items detected at the threshold that flags 5% of the safe ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from ..model.build import ClipBundle
from ..model.hyperbolic import safe_radii
from ..model.safe_radii import CheckpointIdentity, find_radii, radii_path, record_radii
from ..model.similarity import LorentzSimilarity
from .encode import encode_image_files, encode_texts
from .galleries import PairEmbeddings, distinct
from .intervals import PER_QUERY, encode_outcomes
from .metrics import roc_auc

log = logging.getLogger(__name__)

DETECTOR_FALSE_POSITIVE_RATE = 0.05


def measure_safe_radii(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    percentile: float,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
) -> dict[str, float]:
    """``{"text", "image"}`` safe radii of ``bundle`` (a hyperbolic model) on ``qset``'s safe
    captions and distinct safe images (the text radius stands in for the image one on
    text-only data, where no image is ever a query)."""
    return safe_radii(safe_item_distances(bundle, qset, batch_size, num_workers, progress), percentile)


def safe_item_distances(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """The distances from the origin of ``qset``'s safe captions and distinct safe images."""
    sim = bundle.similarity
    if not isinstance(sim, LorentzSimilarity):
        raise ValueError(f"safe radii need a hyperbolic model; {bundle.source} uses {sim.kind} similarity")
    text = encode_texts(bundle, qset.safe_captions, batch_size, progress, desc="safe radii: safe captions")
    distances = {"text": sim.distance_from_origin(text)}
    if qset.mode.has_safe_images:
        images, _, _ = distinct([q.safe_image for q in qset], [q.id for q in qset])
        features = encode_image_files(
            bundle, images, batch_size, num_workers, progress, desc="safe radii: safe images", field="safe_image"
        )
        distances["image"] = sim.distance_from_origin(features)
    else:  # text-only data: no image is ever a query
        distances["image"] = distances["text"]
    return distances


def run_data_config(run_dir: Path | None) -> Mapping[str, Any] | None:
    """The ``data`` section of a run's ``config_resolved.yaml`` (None: no run folder or no config)."""
    if run_dir is None:
        return None
    from ..export.run_records import read_run_config  # the one reader of a run's config

    cfg = read_run_config(run_dir)
    data = (cfg or {}).get("data")
    return data if isinstance(data, Mapping) and (data.get("splits") or {}).get("train") else None


def checkpoint_radii(
    bundle: ClipBundle,
    identity: CheckpointIdentity,
    run_dir: Path | None,
    percentile: float,
    measure: bool = True,
    data_cfg: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """The safe-radii record of the checkpoint ``identity`` (``bundle``: its model, merged),
    from the run's ``safe_radii.json``; with ``measure``, one it lacks is measured on the
    training split of ``data_cfg`` (default: the run's own data config) and recorded.

    Returns ``(record, None)``, or ``(None, why)`` when there is no record and it cannot (or
    may not) be measured: ``why`` says what is missing, in words for a one-line message."""
    record = find_radii(run_dir, identity, percentile)
    if record is not None:
        return record, None
    where = radii_path(run_dir) if run_dir is not None else None
    if not measure:
        return None, f"{where or 'no run folder'} holds no safe radii of {identity.describe()}"
    data = data_cfg if data_cfg is not None else run_data_config(run_dir)
    if run_dir is None or data is None:
        why = (
            "it is not inside a run folder"
            if run_dir is None
            else f"{run_dir} has no config_resolved.yaml with a training split"
        )
        return None, f"no safe radii of {identity.describe()} are recorded and they cannot be measured: {why}"
    from ..toyworld.generate import ensure_toy_world

    # asked for (training's end) it is routine; found missing while loading, worth a line
    say = log.info if data_cfg is not None else log.warning
    say(
        "%s: no safe radii of %s yet: measuring them on the training split (%g th percentile)",
        where,
        identity.describe(),
        percentile,
    )
    ensure_toy_world(data)
    radii = measure_safe_radii(bundle, load_split(data, "train"), percentile, int(data.get("eval_batch_size", 256)))
    return record_radii(run_dir, identity, radii, percentile), None


# ----------------------------------------------------------------------------- the traversal swept
def radii_at(name: str, bundle: ClipBundle, percentile: float, distances: dict[str, Any]):
    """``bundle``'s geometry in safe mode with its radii at ``percentile`` of the training
    split's safe items' distances from the origin (``distances``: :func:`safe_distances`)."""
    return bundle.similarity.with_radii(safe_radii(distances, percentile))


def safe_distances(name: str, bundle: ClipBundle, data_cfg: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    """:func:`safe_item_distances` of the ``train`` split of ``data_cfg`` for the model called
    ``name`` (a Euclidean model is a configuration error naming it); ``kw``: batch size,
    workers, progress."""
    if not isinstance(bundle.similarity, LorentzSimilarity):
        raise ConfigError(
            f"model {name!r}: traversal_percentile is for a hyperbolic (HySAC) model; this one is Euclidean"
        )
    return safe_item_distances(bundle, load_split(data_cfg, "train"), **kw)


def origin_detector_metrics(emb: PairEmbeddings) -> dict[str, Any]:
    """``origin_detector_{text,image}_auc`` and ``..._detected@5fpr`` of a hyperbolic model's
    embeddings (empty for a Euclidean one): unsafe captions vs safe captions, unsafe images
    vs safe images. ``per_query`` keeps each unsafe item's detected / missed outcome (the
    threshold, set on the safe items, taken as given), for its exact interval."""
    sim = emb.similarity
    if not isinstance(sim, LorentzSimilarity):
        return {}
    out: dict[str, Any] = {PER_QUERY: {}}
    pairs = {"text": (emb.safe_text, emb.unsafe_text), "image": (emb.safe_image, emb.unsafe_image)}
    for modality, (safe, unsafe) in pairs.items():
        if safe is None or unsafe is None or not len(safe) or not len(unsafe):
            continue
        d_safe, d_unsafe = sim.distance_from_origin(safe), sim.distance_from_origin(unsafe)
        threshold = torch.quantile(d_safe.double(), 1 - DETECTOR_FALSE_POSITIVE_RATE)
        labels = torch.cat([torch.zeros(len(d_safe), dtype=torch.bool), torch.ones(len(d_unsafe), dtype=torch.bool)])
        out[f"origin_detector_{modality}_auc"] = roc_auc(torch.cat([d_safe, d_unsafe]), labels)
        detected = d_unsafe.double() > threshold
        out[f"origin_detector_{modality}_detected@5fpr"] = float(detected.float().mean())
        out[f"origin_detector_{modality}_false_positives"] = float((d_safe.double() > threshold).float().mean())
        out[PER_QUERY][f"origin_detector_{modality}_detected@5fpr"] = encode_outcomes(detected)
    return out if out[PER_QUERY] else {}

"""What only a hyperbolic (HySAC) model has: its safe radii, and the distance from the origin as
a training-free unsafe detector (docs/METHOD.md, "HySAC").

* :func:`measure_safe_radii`: the ``percentile`` of the safe items' distances from the origin,
  per modality, measured once after training on the training split and saved with the model.
* :func:`safe_distances` / :func:`radii_at`: the traversal swept without retraining (a
  model's ``traversal_percentile``): the training split's safe distances measured once per
  set of weights, the radii taken at another percentile of them.
* :func:`origin_detector_metrics`: an item is flagged unsafe when it lies farther from the
  origin than a threshold. AUC (safe vs unsafe items of one modality) and the share of unsafe
  items detected at the threshold that flags 5% of the safe ones.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from ..model.build import ClipBundle
from ..model.hyperbolic import safe_radii
from ..model.similarity import LorentzSimilarity
from .encode import encode_image_files, encode_texts
from .galleries import PairEmbeddings, distinct
from .metrics import roc_auc

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
        features = encode_image_files(bundle, images, batch_size, num_workers, progress, desc="safe radii: safe images", field="safe_image")
        distances["image"] = sim.distance_from_origin(features)
    else:  # text-only data: no image is ever a query
        distances["image"] = distances["text"]
    return distances


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
        raise ConfigError(f"model {name!r}: traversal_percentile is for a hyperbolic (HySAC) model; this one is Euclidean")
    return safe_item_distances(bundle, load_split(data_cfg, "train"), **kw)


def origin_detector_metrics(emb: PairEmbeddings) -> dict[str, Any]:
    """``origin_detector_{text,image}_auc`` and ``..._detected@5fpr`` of a hyperbolic model's
    embeddings (empty for a Euclidean one): unsafe captions vs safe captions, unsafe images
    vs safe images."""
    sim = emb.similarity
    if not isinstance(sim, LorentzSimilarity):
        return {}
    out: dict[str, Any] = {}
    pairs = {"text": (emb.safe_text, emb.unsafe_text), "image": (emb.safe_image, emb.unsafe_image)}
    for modality, (safe, unsafe) in pairs.items():
        if safe is None or unsafe is None or not len(safe) or not len(unsafe):
            continue
        d_safe, d_unsafe = sim.distance_from_origin(safe), sim.distance_from_origin(unsafe)
        threshold = torch.quantile(d_safe.double(), 1 - DETECTOR_FALSE_POSITIVE_RATE)
        labels = torch.cat([torch.zeros(len(d_safe), dtype=torch.bool), torch.ones(len(d_unsafe), dtype=torch.bool)])
        out[f"origin_detector_{modality}_auc"] = roc_auc(torch.cat([d_safe, d_unsafe]), labels)
        out[f"origin_detector_{modality}_detected@5fpr"] = float((d_unsafe.double() > threshold).float().mean())
        out[f"origin_detector_{modality}_false_positives"] = float((d_safe.double() > threshold).float().mean())
    return out

"""How a model compares its embeddings: the one seam between a model and every metric.

A model's raw encoder outputs become embeddings by :meth:`Similarity.embed`, and a query is
scored against a gallery by :meth:`Similarity.scores` (higher = more similar). Evaluation
asks the model for its similarity (``ClipBundle.similarity``) and never branches on the
model's kind:

* :class:`CosineSimilarity` (every Euclidean CLIP, Safe-CLIP, SafeR-CLIP): L2-normalised
  embeddings, score = cosine = dot product.
* :class:`LorentzSimilarity` (HySAC): embeddings are points of the Lorentz model
  (:mod:`saferclip.model.lorentz`), score = − geodesic distance. Its **safe** mode applies
  the safety traversal to the *query* (a query farther from the origin than its modality's
  safe radius moves back to it; the gallery is untouched); its **moderation** mode does not.

Both are plain, frozen values: they are saved with an exported model and cost nothing to copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from . import lorentz

MODALITIES = ("text", "image")
MODES = ("safe", "moderation")


def _check_modality(modality: str | None) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality


class Similarity:
    """The interface; see the module docstring."""

    kind: ClassVar[str] = ""

    def embed(self, features: Tensor, modality: str) -> Tensor:
        """Raw encoder outputs ``[N, D]`` → this model's embeddings ``[N, D]`` (float32)."""
        raise NotImplementedError

    def scores(self, queries: Tensor, gallery: Tensor, query_modality: str | None = None) -> Tensor:
        """``[Q, G]`` similarity of every query to every gallery item (higher = closer)."""
        raise NotImplementedError

    def prototypes(self, embeddings: Tensor) -> Tensor:
        """One embedding per class from several ``[C, T, D]`` (prompt templates): ``[C, D]``."""
        raise NotImplementedError

    def directions(self, embeddings: Tensor) -> Tensor:
        """Unit directions ``[N, D]`` of embeddings, seen from the origin (for cosine histograms)."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.kind


@dataclass(frozen=True)
class CosineSimilarity(Similarity):
    kind: ClassVar[str] = "cosine"

    def embed(self, features: Tensor, modality: str) -> Tensor:
        return F.normalize(features.float(), dim=-1)

    def scores(self, queries: Tensor, gallery: Tensor, query_modality: str | None = None) -> Tensor:
        return queries @ gallery.T

    def prototypes(self, embeddings: Tensor) -> Tensor:
        # CLIP_benchmark: mean of the normalised template embeddings, renormalised
        return F.normalize(F.normalize(embeddings, dim=-1).mean(1), dim=-1)

    def directions(self, embeddings: Tensor) -> Tensor:
        return embeddings  # already unit vectors


COSINE = CosineSimilarity()


@dataclass(frozen=True)
class LorentzSimilarity(Similarity):
    """Negative geodesic distance in the Lorentz model of curvature ``-curvature``.

    ``text_scale`` / ``image_scale``: the learnt factor α applied to each tower's raw output
    before the exponential map; ``radius_text`` / ``radius_image``: the safe radii (None until
    computed after training); ``traversal``: the safe mode (queries traversed)."""

    curvature: float
    text_scale: float
    image_scale: float
    radius_text: float | None = None
    radius_image: float | None = None
    traversal: bool = False
    kind: ClassVar[str] = "lorentz"

    def __post_init__(self) -> None:
        if not self.curvature > 0:
            raise ValueError(f"curvature must be > 0, got {self.curvature}")
        if self.traversal and (self.radius_text is None or self.radius_image is None):
            raise ValueError("the safe mode (traversal) needs the safe radii of both modalities")

    @property
    def mode(self) -> str:
        return "safe" if self.traversal else "moderation"

    @property
    def label(self) -> str:
        return f"lorentz ({self.mode} mode)"

    def with_mode(self, mode: str) -> LorentzSimilarity:
        """The same geometry in ``safe`` (traversal on) or ``moderation`` mode."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "safe" and (self.radius_text is None or self.radius_image is None):
            raise ConfigError(
                "the safe mode needs the safe radii of both modalities (measured on the safe training items; training "
                "records them with each checkpoint in its run's safe_radii.json, and an export carries them)"
            )
        return replace(self, traversal=mode == "safe")

    def with_radii(self, radii: Mapping[str, float]) -> LorentzSimilarity:
        """The same geometry in safe mode with the safe radii ``{"text", "image"}``."""
        return replace(self, radius_text=float(radii["text"]), radius_image=float(radii["image"]), traversal=True)

    def scale(self, modality: str) -> float:
        return self.text_scale if _check_modality(modality) == "text" else self.image_scale

    def radius(self, modality: str) -> float | None:
        return self.radius_text if _check_modality(modality) == "text" else self.radius_image

    def embed(self, features: Tensor, modality: str) -> Tensor:
        return lorentz.expmap0(features.float() * self.scale(modality), self.curvature)

    def traverse(self, x: Tensor, modality: str) -> Tensor:
        """The safety traversal of points of ``modality`` (see :func:`saferclip.model.lorentz.traverse`)."""
        radius = self.radius(modality)
        if radius is None:
            raise ValueError("no safe radius: compute it after training (saferclip.training.hysac.safe_radii)")
        return lorentz.traverse(x, radius, self.curvature)

    def scores(self, queries: Tensor, gallery: Tensor, query_modality: str | None = None) -> Tensor:
        if self.traversal:
            if query_modality is None:
                raise ValueError("the safe mode traverses the query: its modality (text or image) is needed")
            queries = self.traverse(queries, query_modality)
        return -lorentz.pairwise_distance(queries, gallery, self.curvature)

    def prototypes(self, embeddings: Tensor) -> Tensor:
        # the mean in the tangent space at the origin, mapped back (MERU's zero-shot classifier
        # averages the templates' features before the lift)
        return lorentz.expmap0(lorentz.logmap0(embeddings, self.curvature).mean(1), self.curvature)

    def directions(self, embeddings: Tensor) -> Tensor:
        return F.normalize(lorentz.logmap0(embeddings, self.curvature), dim=-1)

    def distance_from_origin(self, embeddings: Tensor) -> Tensor:
        return lorentz.distance_from_origin(embeddings, self.curvature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "curvature": self.curvature,
            "text_scale": self.text_scale,
            "image_scale": self.image_scale,
            "radius_text": self.radius_text,
            "radius_image": self.radius_image,
        }


def query_modality(letter: str) -> str:
    """The modality of a metric key's query letter: S / U captions, V / G / D images."""
    if letter in ("S", "U"):
        return "text"
    if letter in ("V", "G", "D"):
        return "image"
    raise ValueError(f"unknown item letter {letter!r}; expected one of S, U, V, G, D")


def chunk_scorer(similarity: Similarity | None, modality: str | None):
    """A ``score(queries, gallery) -> [Q, G]`` function for the chunked metrics (None: dot product)."""
    if similarity is None or isinstance(similarity, CosineSimilarity):
        return None
    return lambda queries, gallery: similarity.scores(queries, gallery, modality)


__all__ = [
    "COSINE",
    "CosineSimilarity",
    "LorentzSimilarity",
    "MODALITIES",
    "MODES",
    "Similarity",
    "chunk_scorer",
    "query_modality",
]

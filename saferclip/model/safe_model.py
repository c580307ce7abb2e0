"""One object for any model saferclip made or can read: :func:`load` returns a :class:`SafeModel`
with ``encode_text``, ``encode_image``, ``similarity`` and ``traverse``, whatever the method.

    import saferclip
    model = saferclip.load_model("outputs/runs/hysac-<hash>/export")          # safe mode
    moderation = saferclip.load_model("outputs/runs/hysac-<hash>/export", mode="moderation")
    scores = model.similarity(model.encode_text(["a caption"]), model.encode_image(images))

For a Euclidean model (Safe-CLIP, SafeR-CLIP, any open_clip CLIP) embeddings are unit vectors
and the similarity is cosine; for a hyperbolic one (HySAC) they are points of the Lorentz
model and the similarity is the negative geodesic distance, with the query traversed to the
safe radius in safe mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .build import ClipBundle, eval_mode
from .similarity import LorentzSimilarity, Similarity
from .trained import load_model


class SafeModel:
    """A loaded model and its own geometry (see the module docstring)."""

    def __init__(self, bundle: ClipBundle):
        self.bundle = bundle

    @property
    def geometry(self) -> Similarity:
        return self.bundle.similarity

    @property
    def mode(self) -> str | None:
        """``safe`` / ``moderation`` for a hyperbolic model, None for a Euclidean one."""
        sim = self.geometry
        return sim.mode if isinstance(sim, LorentzSimilarity) else None

    @property
    def preprocess(self):
        return self.bundle.preprocess

    def _device(self) -> torch.device:
        return next(self.bundle.model.parameters()).device

    def encode_text(self, texts: Sequence[str] | Tensor) -> Tensor:
        """Embeddings ``[N, D]`` of captions (strings, or tokens from ``bundle.tokenizer``)."""
        tokens = texts if isinstance(texts, Tensor) else self.bundle.tokenizer(list(texts))
        with eval_mode(self.bundle.model), torch.inference_mode():
            features = self.bundle.model.encode_text(tokens.to(self._device()))
        return self.geometry.embed(features, "text")

    def encode_image(self, images: Sequence[Any] | Tensor) -> Tensor:
        """Embeddings ``[N, D]`` of images: PIL images, or a preprocessed batch ``[N, 3, H, W]``."""
        batch = images if isinstance(images, Tensor) else torch.stack([self.bundle.preprocess(i) for i in images])
        param = next(self.bundle.model.parameters())
        with eval_mode(self.bundle.model), torch.inference_mode():
            features = self.bundle.model.encode_image(batch.to(device=param.device, dtype=param.dtype))
        return self.geometry.embed(features, "image")

    def similarity(self, queries: Tensor, gallery: Tensor, query_modality: str = "text") -> Tensor:
        """``[Q, G]`` scores, higher = closer (the safe mode traverses the queries first)."""
        return self.geometry.scores(queries, gallery, query_modality)

    def traverse(self, embeddings: Tensor, modality: str) -> Tensor:
        """The safety traversal of a hyperbolic model's embeddings; a Euclidean model has none."""
        sim = self.geometry
        if not isinstance(sim, LorentzSimilarity):
            raise ValueError(f"{self.bundle.source}: a Euclidean CLIP ({sim.kind} similarity) has no safety traversal")
        return sim.traverse(embeddings, modality)


def load(path: str | Path, mode: str | None = None, device: str = "cpu", arch: str | None = None) -> SafeModel:
    """A :class:`SafeModel` from an exported folder (``local-dir:`` prefix allowed), a training
    checkpoint or run folder, a weights file, or an open_clip tag (with ``arch``). ``mode``:
    ``safe`` (default where the model has safe radii) or ``moderation``, hyperbolic models only."""
    where = str(path)
    where = where.removeprefix("local-dir:")
    return SafeModel(load_model(arch, where, device=device, mode=mode))

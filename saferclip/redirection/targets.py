"""Who each unsafe item is redirected to: the targets of both methods, and the curriculum.

Both methods share this code; they differ only in the targets:
- Safe-CLIP (``paired``): unsafe item i goes to its own safe pair i;
- SafeR-CLIP (``neighbours``): unsafe item i goes to its k closest safe alternatives in the
  pool, found once by FAISS over the frozen model's embeddings (:mod:`.neighbours`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.records import QuadrupletSet
from .cache_format import EmbeddingCache

if TYPE_CHECKING:
    from .neighbours import SafeNeighbours


@dataclass
class RedirectionTargets:
    """Per training item: ``indices [N, k]`` into the safe pool, ``weights [N, k]`` (rows sum
    to 1), ``pair_weight [N]`` (neighbour-quality guard) and ``bucket [N]`` (curriculum:
    0 easy, 1 medium, 2 hard; None when there is no curriculum)."""

    indices: torch.Tensor
    weights: torch.Tensor
    pair_weight: torch.Tensor
    bucket: torch.Tensor | None = None
    difficulty: torch.Tensor | None = None

    @classmethod
    def paired(cls, n: int) -> RedirectionTargets:
        """Safe-CLIP's rigid targets: each unsafe item is redirected to its own pair."""
        return cls(torch.arange(n).unsqueeze(1), torch.ones(n, 1), torch.ones(n))

    def __post_init__(self) -> None:
        n = len(self.indices)
        if self.indices.ndim != 2 or self.weights.shape != self.indices.shape or self.pair_weight.shape != (n,):
            raise ValueError(
                f"inconsistent targets: indices {tuple(self.indices.shape)}, weights {tuple(self.weights.shape)}, "
                f"pair_weight {tuple(self.pair_weight.shape)}"
            )

    def curriculum_subset(self, epoch: int) -> torch.Tensor:
        """Item indices trained in ``epoch`` (0-based): easy, then easy+medium, then all."""
        if self.bucket is None:
            return torch.arange(len(self.indices))
        return torch.nonzero(self.bucket <= min(epoch, 2)).squeeze(1)


@dataclass
class SafePool:
    """The safe alternatives redirection can target: captions, images and frozen embeddings.

    ``text [P, D]``, ``image [P, D]`` or None. By default the training set's safe side; an
    extra safe corpus appends captions without images.
    """

    captions: list[str]
    images: list[Path | None]
    text: torch.Tensor
    image: torch.Tensor | None


def paired_targets(n: int) -> RedirectionTargets:
    """Safe-CLIP's rigid targets: each unsafe item is redirected to its own pair."""
    return RedirectionTargets.paired(n)


def neighbour_targets(neighbours: SafeNeighbours, curriculum: bool) -> RedirectionTargets:
    """SafeR-CLIP's targets from the neighbour index: the top-k pool positions, their softmax
    weights, the guard's pair weights, and (with ``curriculum``) the difficulty buckets."""
    return RedirectionTargets(
        indices=torch.as_tensor(neighbours.indices, dtype=torch.long),
        weights=torch.as_tensor(neighbours.weights, dtype=torch.float32),
        pair_weight=torch.as_tensor(neighbours.pair_weight, dtype=torch.float32),
        bucket=torch.as_tensor(neighbours.bucket) if curriculum else None,
        difficulty=torch.as_tensor(neighbours.difficulty),
    )


def safe_pool(train: QuadrupletSet, cache: EmbeddingCache, pool_size: int | None = None) -> SafePool:
    """The pool the targets index: the training set's safe captions and images (frozen
    embeddings from the cache), then the cache's extra safe captions up to ``pool_size``
    (extra captions have no image: their image rows are zero and never a live target)."""
    captions = list(train.safe_captions)
    images: list[Path | None] = [q.safe_image for q in train]
    text, image = cache.safe_text.float(), None if cache.safe_image is None else cache.safe_image.float()
    n_extra = (pool_size or len(train)) - len(train)
    if n_extra > 0:
        captions += list(cache.extra_safe_captions)[:n_extra]
        images += [None] * n_extra
        text = torch.cat([text, cache.extra_safe_text[:n_extra].float()])
        if image is not None:
            image = torch.cat([image, torch.zeros(n_extra, image.shape[1], dtype=image.dtype)])
    return SafePool(captions, images, text, image)

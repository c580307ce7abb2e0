"""The training and validation datasets: quadruplets with their frozen embeddings and targets.

Every frozen embedding a loss needs comes from the embedding cache, row by row, so a
training step runs only the trainable encoders and the targets can never drift. The targets
themselves (:class:`~saferclip.redirection.targets.RedirectionTargets`) are chosen in
:mod:`saferclip.redirection`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from ..data.image_shards import ImageShards
from ..data.images import load_image
from ..data.records import QuadrupletSet
from ..model.build import tokenize_checked
from ..redirection.targets import RedirectionTargets, SafePool


class RedirectionDataset(Dataset):
    """Items of a quadruplet set with their frozen embeddings and redirection targets.

    Each item is a dict of tensors (keys absent when the data has no such input):
    ``index``, ``safe_text``, ``unsafe_text``, ``safe_image``, ``unsafe_image``, ``frozen_safe_text``,
    ``frozen_unsafe_text``, ``frozen_safe_image``, ``frozen_unsafe_image``, ``frozen_target_text [k, D]``, ``frozen_target_image [k, D]``,
    ``target_weights [k]``, ``pair_weight``, and for the live terms ``target_text`` and
    ``target_image`` (the top-1 target, encoded by the trainable model).
    """

    def __init__(
        self,
        qset: QuadrupletSet,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable,
        frozen: dict[str, torch.Tensor | None],
        targets: RedirectionTargets,
        pool: SafePool,
        live_targets: bool = False,
        memo_images: bool = False,
        image_shards: ImageShards | None = None,
    ):
        if len(targets.indices) != len(qset):
            raise ValueError(f"{len(targets.indices)} targets for {len(qset)} items")
        self.qset, self.preprocess, self.frozen = qset, preprocess, frozen
        self.targets, self.pool, self.live_targets = targets, pool, live_targets
        self.safe_tokens = tokenize_checked(tokenizer, qset.safe_captions, f"{qset.source}: safe captions")
        self.unsafe_tokens = tokenize_checked(tokenizer, qset.unsafe_captions, f"{qset.source}: unsafe captions")
        self.target_text_tokens = tokenizer(pool.captions) if live_targets else None
        self.use_safe_images = qset.mode.has_safe_images
        self.use_unsafe_images = qset.mode.has_unsafe_images
        self._memo: dict[Path, torch.Tensor] | None = {} if memo_images else None
        self.image_shards = image_shards  # pre-resized images (data/image_shards.py): no JPEG decode

    def __len__(self) -> int:
        return len(self.qset)

    def image(self, path: Path) -> torch.Tensor:
        if self.image_shards is not None and path in self.image_shards:
            return self.image_shards.image(path)
        if self._memo is None:
            return self.preprocess(load_image(path))
        if path not in self._memo:
            self._memo[path] = self.preprocess(load_image(path))
        return self._memo[path]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once, already collated (``[B, ...]`` per key; what
        ``default_collate`` would make of the items, without building B dicts first). The
        DataLoader calls this when the loader's ``collate_fn`` is :func:`collate_items`."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        targets = self.targets.indices[rows]
        batch = {
            "index": rows,
            "safe_text": self.safe_tokens[rows],
            "unsafe_text": self.unsafe_tokens[rows],
            "target_weights": self.targets.weights[rows],
            "pair_weight": self.targets.pair_weight[rows],
            "frozen_target_text": self.pool.text[targets],
        }
        for key in ("frozen_safe_text", "frozen_unsafe_text", "frozen_safe_image", "frozen_unsafe_image"):
            if self.frozen.get(key) is not None:
                batch[key] = self.frozen[key][rows]
        if self.pool.image is not None:
            batch["frozen_target_image"] = self.pool.image[targets]
        items = [self.qset[i] for i in indices]
        if self.use_safe_images:
            batch["safe_image"] = torch.stack([self.image(q.safe_image) for q in items])
        if self.use_unsafe_images:
            batch["unsafe_image"] = torch.stack([self.image(q.unsafe_image) for q in items])
        if self.live_targets:
            batch["target_text"] = self.target_text_tokens[targets[:, 0]]
            if self.use_safe_images:
                batch["target_image"] = torch.stack([self.image(self.live_target_image(i)) for i in indices])
        return batch

    def live_target_image(self, i: int) -> Path:
        """The safe image the live terms encode for item ``i``: its best-ranked target that has
        an image. A caption of an extra safe pool has none; if no target of the item has one,
        its own paired safe image stands in. Every item must yield one, so that batches
        collate and every DDP rank computes the same loss terms."""
        for j in self.targets.indices[i].tolist():
            if self.pool.images[j] is not None:
                return self.pool.images[j]
        return self.qset[i].safe_image


class ValidationDataset(Dataset):
    """Captions and images of the validation split: ``safe_text``, ``unsafe_text``, ``safe_image``,
    ``unsafe_image``, and ``owner`` (items sharing a safe image share the index of the first)."""

    def __init__(
        self,
        qset: QuadrupletSet,
        tokenizer,
        preprocess,
        memo_images: bool = False,
        image_shards: ImageShards | None = None,
    ):
        self.inner = RedirectionDataset(
            qset,
            tokenizer,
            preprocess,
            frozen={},
            targets=RedirectionTargets.paired(len(qset)),
            pool=SafePool([], [], torch.zeros(len(qset), 1), None),
            memo_images=memo_images,
            image_shards=image_shards,
        )
        # items sharing a safe image (several captions per image) share an owner: the index of
        # the first such item, so retrieval counts any of them as the right one
        first: dict[Path | None, int] = {}
        self.owner = torch.tensor(
            [first.setdefault(q.safe_image, i) if q.safe_image is not None else i for i, q in enumerate(qset)]
        )

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.inner.__getitems__(indices)
        keep = ("index", "safe_text", "unsafe_text", "safe_image", "unsafe_image")
        out = {k: v for k, v in batch.items() if k in keep}
        out["owner"] = self.owner[torch.as_tensor(indices, dtype=torch.long)]
        return out


def collate_items(batch: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DataLoader's ``collate_fn`` for these datasets: a batch from ``__getitems__`` is
    already collated; a list of single items (another sampler or wrapper) is stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)

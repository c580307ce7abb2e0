"""Lightning DataModule: loads the splits, the frozen-embedding cache and the redirection targets.

``prepare_data`` (rank 0 only) generates the toy world if asked and builds the embedding
cache and neighbour index with the *original* model; ``setup`` (every rank) loads them. So
under DDP the frozen encoders run once, not once per rank.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..embedding_cache import EmbeddingCache, build_or_load_cache
from ..models import ClipBundle, build_clip
from ..redirection import EvalDataset, RedirectionDataset, RedirectionTargets, SafePool, collate_items

log = logging.getLogger("saferclip.data")


def ensure_toy_world(data_cfg: dict) -> None:
    if data_cfg.get("make_toy"):
        from ..toyworld.generate import SMALL_SIZES, ToySizes, make_toy_world

        sizes = {"default": ToySizes(), "small": SMALL_SIZES}
        size = data_cfg.get("toy_size", "default")
        if size not in sizes:
            raise ValueError(f"data.toy_size must be one of {sorted(sizes)}, got {size!r}")
        make_toy_world(data_cfg["root"], seed=int(data_cfg.get("toy_seed", 0)), sizes=sizes[size])


def drop_last_for(n_items: int, batch_size: int, world_size: int) -> bool:
    """Drop the last, partial batch unless it is a rank's only batch. The DistributedSampler
    gives every rank ceil(n / world) items, so all ranks decide alike and keep equal batch
    sizes (all_gather in the InfoNCE terms needs that)."""
    return math.ceil(n_items / max(world_size, 1)) > batch_size


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``seed + epoch``, the same however often it is
    iterated. (A DataLoader with ``shuffle=True`` draws a new order on each ``iter()``, and
    Lightning iterates a reloaded loader more than once when it resumes a run, so a resumed
    run would see other batches than an uninterrupted one.) Under DDP Lightning wraps it in
    a DistributedSamplerWrapper, which shards it the same way on every rank."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n, self.seed, self.epoch = n, seed, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class SaferClipDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: dict,
        model: dict,
        method: dict,
        cache_dir: str,
        live_targets: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.data_cfg, self.model_cfg, self.method_cfg = data, model, method
        self.cache_dir, self.live_targets, self.seed = cache_dir, live_targets, seed
        self.train_set: RedirectionDataset | None = None
        self.val_set: EvalDataset | None = None
        self.targets: RedirectionTargets | None = None
        self.mode = None
        # what prepare_data built, reused by setup in the same process (the model is not
        # built and fingerprinted twice)
        self._prepared: tuple[QuadrupletSet, ClipBundle, EmbeddingCache] | None = None

    # ---------------------------------------------------------------- frozen side, rank 0
    def _frozen(self, build: bool) -> tuple[QuadrupletSet, ClipBundle, EmbeddingCache]:
        """Load the train split and (build or load) its frozen-embedding cache."""
        train = load_split(self.data_cfg, "train")
        if train.skips is not None and train.skips.count:
            log.warning(train.skips.summary())
        bundle = build_clip(self.model_cfg["arch"], self.model_cfg.get("pretrained"))
        extra = None
        neigh_cfg = self.method_cfg.get("neighbours") or {}
        if self.method_cfg["targets"] == "neighbours" and neigh_cfg.get("extra_pool"):
            from ..embedding_cache import load_safe_corpus

            extra = load_safe_corpus(neigh_cfg["extra_pool"])
        cache = build_or_load_cache(
            bundle,
            train,
            self.cache_dir,
            batch_size=int(self.data_cfg.get("eval_batch_size", 256)),
            num_workers=int(self.data_cfg.get("num_workers", 0)),
            progress=build,
            extra_safe_captions=extra,
        )
        return train, bundle, cache

    def prepare_data(self) -> None:
        if self.train_set is not None:  # already set up in this process (e.g. a second fit)
            return
        ensure_toy_world(self.data_cfg)
        self._prepared = self._frozen(build=True)
        if self.method_cfg["targets"] == "neighbours":
            self._neighbours(self._prepared[0], self._prepared[2])  # found once and saved beside the cache

    def _neighbours(self, train: QuadrupletSet, cache: EmbeddingCache):
        from ..neighbours import NeighbourConfig, config_groups, load_or_find_safe_neighbours, pool_text

        cfg = NeighbourConfig(**{k: v for k, v in self.method_cfg["neighbours"].items() if k != "extra_pool"})
        groups = config_groups(train, cfg, len(pool_text(cache, cfg.use_extra_pool)))
        return load_or_find_safe_neighbours(cache, cfg, groups)

    # ---------------------------------------------------------------- every rank
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, bundle, cache = self._prepared or self._frozen(build=False)
        self._prepared = None
        self.targets, pool = self._targets(train, cache)
        frozen = {
            "t0_safe": cache.safe_text,
            "t0_unsafe": cache.unsafe_text,
            "i0_safe": cache.safe_image,
            "i0_unsafe": cache.unsafe_image,
        }
        # float32 once here (a no-op view for a float32 cache), not per step
        frozen = {k: (None if v is None else v.float()) for k, v in frozen.items()}
        memo = bool(self.data_cfg.get("memo_images", self.data_cfg.get("name") == "toy"))
        self.train_set = RedirectionDataset(
            train,
            bundle.tokenizer,
            bundle.preprocess,
            frozen,
            self.targets,
            pool,
            live_targets=self.live_targets,
            memo_images=memo,
        )
        validation = load_split(self.data_cfg, "validation")
        self.val_set = EvalDataset(validation, bundle.tokenizer, bundle.preprocess, memo_images=memo)
        self.tokenizer, self.preprocess = bundle.tokenizer, bundle.preprocess
        self.mode = train.mode

    def _targets(self, train: QuadrupletSet, cache: EmbeddingCache) -> tuple[RedirectionTargets, SafePool]:
        """Each unsafe item's safe targets (its pair, or its neighbours) and the pool they index."""
        captions = list(train.safe_captions)
        images: list[Path | None] = [q.safe_image for q in train]
        text, image = cache.safe_text, cache.safe_image
        if self.method_cfg["targets"] != "neighbours":
            return RedirectionTargets.paired(len(train)), SafePool(captions, images, text.float(), _float(image))
        neighbours = self._neighbours(train, cache)
        targets = RedirectionTargets(
            indices=torch.as_tensor(neighbours.indices, dtype=torch.long),
            weights=torch.as_tensor(neighbours.weights, dtype=torch.float32),
            pair_weight=torch.as_tensor(neighbours.pair_weight, dtype=torch.float32),
            bucket=torch.as_tensor(neighbours.bucket) if self.method_cfg.get("curriculum") else None,
            difficulty=torch.as_tensor(neighbours.difficulty),
        )
        n_extra = neighbours.pool_size - len(train)
        if n_extra > 0:
            captions += list(cache.extra_safe_captions)
            images += [None] * n_extra
            text = torch.cat([text, cache.extra_safe_text])
            if image is not None:
                # extra captions have no images: image targets only exist for the train pool
                image = torch.cat([image, torch.zeros(n_extra, image.shape[1], dtype=image.dtype)])
        return targets, SafePool(captions, images, text.float(), _float(image))

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        subset = self.targets.curriculum_subset(epoch)
        if len(subset) < len(self.train_set):
            log.info("curriculum epoch %d: %d of %d pairs", epoch, len(subset), len(self.train_set))
        batch_size = int(self.data_cfg["batch_size"])
        return DataLoader(
            Subset(self.train_set, subset.tolist()),
            batch_size=batch_size,
            sampler=EpochShuffle(len(subset), self.seed, epoch),
            drop_last=drop_last_for(len(subset), batch_size, world),
            num_workers=int(self.data_cfg.get("num_workers", 0)),
            persistent_workers=False,
            collate_fn=collate_items,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=int(self.data_cfg.get("eval_batch_size", 256)),
            shuffle=False,
            num_workers=int(self.data_cfg.get("num_workers", 0)),
            collate_fn=collate_items,
        )


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()

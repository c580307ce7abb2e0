"""Lightning DataModule: loads the splits, the frozen-embedding cache and the redirection targets.

``prepare_data`` (rank 0 only) generates the toy world if asked; on one process it also builds
the embedding cache and neighbour index with the *original* model, and ``setup`` reuses them.
Under DDP ``setup`` (every rank) builds the cache together: each rank embeds its shard of the
items into the same memory-mapped cache (``build_or_load_cache``), then the neighbour search
runs once (the first rank to take its lock) and the others reuse it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ...data.image_shards import ImageShards
from ...data.splits import load_split
from ...model.build import build_clip
from ...redirection.targets import RedirectionTargets
from ...toyworld.generate import ensure_toy_world
from ...training.datasets import RedirectionDataset, ValidationDataset, collate_items
from ...training.method import MethodConfig
from ...training.prepare import Prepared, prepare

log = logging.getLogger("saferclip.data")


def drop_last_for(n_items: int, batch_size: int, world_size: int) -> bool:
    """Drop the last, partial batch unless it is a rank's only batch. The DistributedSampler
    gives every rank ceil(n / world) items, so all ranks decide alike and keep equal batch
    sizes (all_gather in the InfoNCE terms needs that)."""
    return math.ceil(n_items / max(world_size, 1)) > batch_size


def split_image_shards(data_cfg: Mapping[str, Any], split: str, preprocess) -> ImageShards | None:
    """The split's pre-resized images (``data.image_shards``/<split>, written by
    ``python -m saferclip.app.commands.make_image_shards``) when they exist and match; else None (the
    image files, with a one-line warning when shards are there but damaged or stale). Training
    and its dry run both open them here."""
    root = data_cfg.get("image_shards")
    if not root or not (Path(root) / split / "images.json").is_file():
        return None
    shards = ImageShards.open(Path(root) / split, preprocess)
    if shards is not None:
        log.info("%s images from the shards in %s", split, shards.folder)
    return shards


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
        method: MethodConfig,
        cache_dir: str,
        live_targets: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.data_cfg, self.model_cfg = data, model
        if not isinstance(method, MethodConfig):  # checked once, by hydra_utils.check_train_config
            raise TypeError(f"SaferClipDataModule takes the checked MethodConfig, got {type(method).__name__}")
        self.method = method
        self.cache_dir, self.live_targets, self.seed = cache_dir, live_targets, seed
        self.train_set: RedirectionDataset | None = None
        self.val_set: ValidationDataset | None = None
        # the NSFW-Caps-like validation set (data.nsfw_caps_validation), if the data has one
        self.nsfw_caps_val_set: ValidationDataset | None = None
        self.targets: RedirectionTargets | None = None
        self.mode = None
        # what prepare_data built, reused by setup in the same process (the model is not
        # built and fingerprinted twice)
        self._prepared: Prepared | None = None

    # ---------------------------------------------------------------- frozen side, rank 0
    def prepare_data(self) -> None:
        if self.train_set is not None:  # already set up in this process (e.g. a second fit)
            return
        ensure_toy_world(self.data_cfg)
        if not self.method.needs_cache or self._world_size() > 1:
            return  # HySAC: nothing to build; under DDP every rank builds its shard in setup()
        # one process: the cache and the neighbours are built here, on the training device
        self._prepared = prepare(
            self.data_cfg, self.model_cfg, self.method, self.cache_dir, progress=True, device=self._device()
        )

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _device(self) -> str:
        return str(self.trainer.strategy.root_device) if self.trainer is not None else "cpu"

    # ---------------------------------------------------------------- every rank
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.method.needs_cache:
            self._setup_pairs_only()
            return
        prepared = self._prepared or prepare(
            self.data_cfg,
            self.model_cfg,
            self.method,
            self.cache_dir,
            progress=self.trainer is not None and self.trainer.is_global_zero,
            device=self._device(),
        )
        self._prepared = None
        prepared.bundle.model.to("cpu")  # only its tokenizer and preprocessing are used from here
        cache, bundle = prepared.cache, prepared.bundle
        self.targets = prepared.targets
        frozen = {
            "frozen_safe_text": cache.safe_text,
            "frozen_unsafe_text": cache.unsafe_text,
            "frozen_safe_image": cache.safe_image,
            "frozen_unsafe_image": cache.unsafe_image,
        }
        # float32 once here (a no-op view for a float32 cache), not per step
        frozen = {k: (None if v is None else v.float()) for k, v in frozen.items()}
        memo = bool(self.data_cfg.get("memo_images", self.data_cfg.get("name") == "toy"))
        self.train_set = RedirectionDataset(
            prepared.train,
            bundle.tokenizer,
            bundle.preprocess,
            frozen,
            self.targets,
            prepared.pool,
            live_targets=self.live_targets,
            memo_images=memo,
            image_shards=self._image_shards("train", bundle.preprocess),
        )
        validation = load_split(self.data_cfg, "validation")
        self.val_set = ValidationDataset(
            validation,
            bundle.tokenizer,
            bundle.preprocess,
            memo_images=memo,
            image_shards=self._image_shards("validation", bundle.preprocess),
        )
        self.nsfw_caps_val_set = self._nsfw_caps_validation(bundle, memo)
        self.tokenizer, self.preprocess = bundle.tokenizer, bundle.preprocess
        self.mode = prepared.train.mode

    def _image_shards(self, split: str, preprocess) -> ImageShards | None:
        return split_image_shards(self.data_cfg, split, preprocess)

    def _setup_pairs_only(self) -> None:
        """The training quadruplets as they are (captions tokenised, images preprocessed), with
        no frozen embedding and no target: what HySAC trains on."""
        bundle = build_clip(self.model_cfg["arch"], None)  # its tokenizer and preprocessing only
        memo = bool(self.data_cfg.get("memo_images", self.data_cfg.get("name") == "toy"))
        train = load_split(self.data_cfg, "train")
        if train.skips is not None and train.skips.count:
            log.warning(train.skips.summary())
        self.train_set = ValidationDataset(
            train,
            bundle.tokenizer,
            bundle.preprocess,
            memo_images=memo,
            image_shards=self._image_shards("train", bundle.preprocess),
        )
        self.targets = RedirectionTargets.paired(len(train))  # every pair, every epoch
        validation = load_split(self.data_cfg, "validation")
        self.val_set = ValidationDataset(
            validation,
            bundle.tokenizer,
            bundle.preprocess,
            memo_images=memo,
            image_shards=self._image_shards("validation", bundle.preprocess),
        )
        self.nsfw_caps_val_set = self._nsfw_caps_validation(bundle, memo)
        self.tokenizer, self.preprocess = bundle.tokenizer, bundle.preprocess
        self.mode = train.mode

    def _nsfw_caps_validation(self, bundle, memo: bool) -> ValidationDataset | None:
        """The NSFW-Caps-like validation set ``data.nsfw_caps_validation`` (its S->V R@1 is a
        part of the selection score), or None when the data config names none."""
        from ...data.nsfw_caps import load_nsfw_caps
        from ...errors import ConfigError

        spec = self.data_cfg.get("nsfw_caps_validation") or {}
        if not spec.get("path"):
            return None
        path = Path(spec["path"])
        if not path.is_file():
            raise ConfigError(
                f"data.nsfw_caps_validation.path: no such file: {path} (set data.nsfw_caps_validation=null to select "
                f"without NSFW-Caps S->V)"
            )
        pairs = load_nsfw_caps(
            path,
            image_root=spec.get("image_root"),
            nsfw_image_root=spec.get("nsfw_image_root"),
            on_error=self.data_cfg.get("on_error", "raise"),
        )
        if pairs.skips is not None and pairs.skips.count:
            log.warning(pairs.skips.summary())
        return ValidationDataset(pairs.as_quadruplets(), bundle.tokenizer, bundle.preprocess, memo_images=memo)

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

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split's loader; with the NSFW-Caps-like validation set, both (in
        that order: the module tells them apart by ``dataloader_idx``)."""
        loaders = [self._eval_loader(d) for d in (self.val_set, self.nsfw_caps_val_set) if d is not None]
        return loaders[0] if len(loaders) == 1 else loaders

    def _eval_loader(self, dataset: ValidationDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=int(self.data_cfg.get("eval_batch_size", 256)),
            shuffle=False,
            num_workers=int(self.data_cfg.get("num_workers", 0)),
            collate_fn=collate_items,
        )

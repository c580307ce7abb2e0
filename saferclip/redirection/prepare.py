"""Load → frozen-embedding cache → targets, in one call: what training and ``saferclip-index`` share.

:func:`prepare` loads the training split, builds (or reuses) its cache with the *original*
model and chooses every unsafe item's targets (its pair for Safe-CLIP; its safe neighbours,
found once and saved beside the cache, for SafeR-CLIP). Under DDP the Lightning datamodule
calls it with ``build=True`` on rank 0 first and ``build=False`` on every rank after, so the
frozen encoders run once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from ..model.build import ClipBundle, build_clip
from .cache import EmbeddingCache, build_or_load_cache, load_safe_corpus
from .index import (
    NeighbourConfig,
    SafeNeighbours,
    config_groups,
    load_or_find_safe_neighbours,
    pool_text,
)
from .targets import (
    RedirectionTargets,
    SafePool,
    neighbour_targets,
    paired_targets,
    safe_pool,
)

log = logging.getLogger(__name__)

TARGET_KINDS = ("neighbours", "paired")


@dataclass
class Prepared:
    """Everything the training data needs, built from the original model."""

    train: QuadrupletSet
    bundle: ClipBundle
    cache: EmbeddingCache
    targets: RedirectionTargets
    pool: SafePool
    neighbours: SafeNeighbours | None = None  # None for paired targets


def neighbour_config(method: Mapping[str, Any]) -> NeighbourConfig:
    """The :class:`NeighbourConfig` of a method config's ``neighbours`` section."""
    section = dict(method.get("neighbours") or {})
    section.pop("extra_pool", None)  # a data file, read by prepare(), not a search option
    return NeighbourConfig(**section)


def prepare(
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    method: Mapping[str, Any],
    cache_dir: str,
    build: bool = True,
    device: str = "cpu",
) -> Prepared:
    """The training split, its cache and targets for ``method`` (``targets: paired`` or
    ``neighbours`` with a ``neighbours`` section; ``curriculum``). ``build``: show progress
    while building (rank 0); every call reuses what an earlier one saved. ``device``: where
    the frozen encoders run when the cache is built (the training GPU: a ViT-L/14 embedding
    a ViSU split on a CPU would take hours)."""
    kind = method.get("targets")
    if kind not in TARGET_KINDS:
        raise ConfigError(f"method.targets must be one of {TARGET_KINDS}, got {kind!r}")
    train = load_split(data, "train")
    if train.skips is not None and train.skips.count:
        log.warning(train.skips.summary())
    bundle = build_clip(model["arch"], model.get("pretrained"), device=device)
    extra_pool = (method.get("neighbours") or {}).get("extra_pool") if kind == "neighbours" else None
    cache = build_or_load_cache(
        bundle,
        train,
        cache_dir,
        batch_size=int(data.get("eval_batch_size", 256)),
        num_workers=int(data.get("num_workers", 0)),
        progress=build,
        extra_safe_captions=load_safe_corpus(extra_pool) if extra_pool else None,
    )
    if kind == "paired":
        return Prepared(train, bundle, cache, paired_targets(len(train)), safe_pool(train, cache))
    config = neighbour_config(method)
    pool_size = len(pool_text(cache, config.use_extra_pool))
    neighbours = load_or_find_safe_neighbours(cache, config, config_groups(train, config, pool_size))
    targets = neighbour_targets(neighbours, curriculum=bool(method.get("curriculum")))
    return Prepared(train, bundle, cache, targets, safe_pool(train, cache, neighbours.pool_size), neighbours)

"""Load → frozen-embedding cache → targets, in one call: what training and ``saferclip-index`` share.

:func:`prepare` loads the training split, builds (or reuses) its cache with the *original*
model and chooses every unsafe item's targets (its pair for Safe-CLIP; its safe neighbours,
found once and saved beside the cache, for SafeR-CLIP). Under DDP the Lightning datamodule
calls it on rank 0 first (which builds) and on every rank after (which reuse), so the frozen
encoders run once. It lives in ``training/``: it is the training data's preparation, and the
redirection layer below it imports nothing from above.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.records import QuadrupletSet
from ..data.safe_corpus import load_safe_corpus
from ..data.splits import load_split
from ..model.build import ClipBundle, build_clip
from ..redirection.cache import build_or_load_cache
from ..redirection.cache_format import EmbeddingCache
from ..redirection.large_pool import (
    PoolIndexConfig,
    attach_large_pool,
    check_pool_model,
    is_embedded_pool,
    load_or_build_pool_index,
)
from ..redirection.neighbours import SafeNeighbours, load_or_find_safe_neighbours, pool_text
from ..redirection.pool_shards import PoolShards, check_pool_vectors, check_pool_width, open_pool
from ..redirection.sparse_pools import config_groups
from ..redirection.targets import (
    RedirectionTargets,
    SafePool,
    neighbour_targets,
    paired_targets,
    safe_pool,
)
from .method import MethodConfig

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything the training data needs, built from the original model."""

    train: QuadrupletSet
    bundle: ClipBundle
    cache: EmbeddingCache
    targets: RedirectionTargets
    pool: SafePool
    neighbours: SafeNeighbours | None = None  # None for paired targets


def prepare(
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    method: MethodConfig,
    cache_dir: str,
    progress: bool = True,
    device: str = "cpu",
) -> Prepared:
    """The training split, its cache and targets for ``method`` (the checked
    :class:`MethodConfig`, :func:`~saferclip.training.method.method_config`: ``targets``
    paired or neighbours, its ``neighbours`` section, ``curriculum``). ``progress``: show progress bars while building
    (rank 0); every call reuses what an earlier one saved. ``device``: where the frozen
    encoders run when the cache is built (the training GPU: a ViT-L/14 embedding a ViSU split
    on a CPU would take hours)."""
    if not isinstance(method, MethodConfig):  # a dict would skip the one schema check
        raise TypeError(
            f"prepare takes the checked MethodConfig (saferclip.training.method.method_config), got {type(method).__name__}"
        )
    config = method
    kind = config.targets
    train = load_split(data, "train")
    if train.skips is not None and train.skips.count:
        log.warning(train.skips.summary())
    bundle = build_clip(model["arch"], model.get("pretrained"), device=device)
    extra_pool = config.extra_pool
    embedded = is_embedded_pool(extra_pool)  # a folder of embedding shards, not a caption file
    cache = build_or_load_cache(
        bundle,
        train,
        cache_dir,
        batch_size=int(data.get("eval_batch_size", 256)),
        num_workers=int(data.get("num_workers", 0)),
        progress=progress,
        extra_safe_captions=load_safe_corpus(extra_pool) if extra_pool and not embedded else None,
    )
    if kind == "paired":
        return Prepared(train, bundle, cache, paired_targets(len(train)), safe_pool(train, cache))
    search = config.neighbours
    if embedded and search.use_extra_pool and search.mode == "text":
        cache = with_embedded_pool(cache, bundle, extra_pool, Path(cache_dir) / "pools", search.k, config.pool_index)
    pool_size = len(pool_text(cache, search.use_extra_pool))
    neighbours = load_or_find_safe_neighbours(cache, search, config_groups(train, search, pool_size))
    targets = neighbour_targets(neighbours, curriculum=config.curriculum)
    return Prepared(train, bundle, cache, targets, safe_pool(train, cache, neighbours.pool_size), neighbours)


def check_embedded_pool(pool_dir: str, bundle: ClipBundle) -> PoolShards:
    """What training refuses in an embedded extra pool, checked without building its index
    (``saferclip-train dry_run=true``): its layout, its width against the model's, every vector
    finite and normalised, and its captions embedded by this model (a sample across the pool)."""
    import numpy as np

    from ..model.build import encode_text

    def encode(captions: list[str]):
        return encode_text(bundle, captions, 64).float().numpy()

    shards = open_pool(pool_dir)
    check_pool_width(shards, int(encode(["a photo"]).shape[1]), bundle.arch)
    check_pool_vectors(shards)
    check_pool_model(shards, np.arange(len(shards)), encode)
    return shards


def with_embedded_pool(
    cache: EmbeddingCache, bundle: ClipBundle, pool_dir: str, index_dir: Path, k: int, index: PoolIndexConfig | None
) -> EmbeddingCache:
    """The cache whose extra pool holds the candidates of a large embedded pool (clip-retrieval
    layout) for its unsafe captions: the index (IVF-PQ, re-ranked exactly) is built once per pool
    under ``index_dir``; each unsafe caption contributes its top ``max(4k, 16)`` rows, so the
    guard's exclusions still leave it k candidates."""
    from ..model.build import encode_text

    shards = open_pool(pool_dir)
    check_pool_width(shards, cache.dim, bundle.arch)
    pool = load_or_build_pool_index(shards, index_dir, index or PoolIndexConfig())

    def encode(captions: list[str]):
        return encode_text(bundle, captions, 64).float().numpy()

    return attach_large_pool(cache, pool, per_query=max(4 * k, 16), encode_captions=encode)

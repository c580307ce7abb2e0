"""Safe-neighbour targets: each unsafe item's closest safe alternatives (docs/METHOD.md,
"Finding the targets").

:func:`find_safe_neighbours` maps an :class:`EmbeddingCache` to SafeR-CLIP's targets: the
neighbour mode (text / image / joint space), top-k softmax weights, the neighbour-quality guard
(with its optional own-pair fallback), per-pair difficulty and curriculum buckets, in a
:class:`SafeNeighbours` that saves itself beside the cache (:func:`load_or_find_safe_neighbours`).
Its settings are :class:`saferclip.redirection.neighbour_config.NeighbourConfig`. The search itself is :mod:`saferclip.redirection.faiss_search`; sparse pools are
:mod:`saferclip.redirection.sparse_pools`; reports (``summarize``, the toy world's
``attribute_agreement``) :mod:`saferclip.redirection.report`.

Pool positions: ``0 .. n_set-1`` are the set's own safe items (position ``i`` = item ``i``);
``n_set ..`` are the extra safe captions of the cache (text mode only; they have no image).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_folder, file_lock, remove_leftovers, write_json_atomic
from ..integrity import DamagedArtefact, check_finite, check_index_range, digests, verify_all
from .cache_format import EmbeddingCache
from .faiss_search import NeighbourError, as_search_matrix, check_search_shapes, make_index
from .neighbour_config import NeighbourConfig
from .sparse_pools import ItemGroups, search_filtered, sparse_filter

log = logging.getLogger(__name__)

NEIGHBOURS_FORMAT_VERSION = 1
_SAVED_ARRAYS = ("indices", "similarities", "weights", "pair_weight", "difficulty", "bucket", "flagged")


# ----------------------------------------------------------------------------- safe neighbours
@dataclass
class SafeNeighbours:
    """Each unsafe item's safe targets. ``N`` items, ``k`` neighbours each.

    - ``indices [N, k]`` pool positions, best first (``< n_set``: item of the set; else extra caption)
    - ``similarities [N, k]`` cosine in the mode's space
    - ``weights [N, k]`` softmax(similarity / T), zeroed below ``min_similarity`` and renormalised
      over what is left: each row sums to 1, or is all 0 for a flagged item
    - ``pair_weight [N]`` multiplies the item's redirection loss: 0 flagged, else 1, or the
      weighted similarity with ``weight_by_similarity``
    - ``difficulty [N]`` the paper's difficulty: the (softmax-weighted) similarity to the target —
      *higher is easier*; ``bucket [N]`` 0 easy / 1 medium / 2 hard thirds of it
    """

    indices: torch.Tensor
    similarities: torch.Tensor
    weights: torch.Tensor
    pair_weight: torch.Tensor
    difficulty: torch.Tensor
    bucket: torch.Tensor
    flagged: torch.Tensor  # [N] bool: no candidate passed min_similarity
    config: NeighbourConfig
    n_set: int
    pool_size: int
    cache_key: str
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.indices.shape[0]

    # -- persistence: cache.path / neighbours / <config hash>/
    @staticmethod
    def folder(cache: EmbeddingCache, config: NeighbourConfig) -> Path:
        return cache.path / "neighbours" / config.fingerprint()

    def save(self, cache: EmbeddingCache) -> Path:
        """Write beside the cache (npy + JSON), atomically (:func:`saferclip.files.atomic_folder`)."""
        if cache.key != self.cache_key:
            raise NeighbourError(f"these neighbours were found in cache {self.cache_key}, not {cache.key}")
        final = self.folder(cache, self.config)
        with atomic_folder(final, replace=True) as tmp:  # same cache + config = same content
            for name in _SAVED_ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name).numpy())
            info = {
                "checksums": digests(tmp, [f"{name}.npy" for name in _SAVED_ARRAYS]),
                "format_version": NEIGHBOURS_FORMAT_VERSION,
                "cache_key": self.cache_key,
                "config": asdict(self.config),
                "config_hash": self.config.fingerprint(),
                "n_set": self.n_set,
                "pool_size": self.pool_size,
                "seconds": self.seconds,
                "meta": self.meta,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            write_json_atomic(tmp / "neighbours.json", info)
        return final

    @classmethod
    def load(cls, cache: EmbeddingCache, config: NeighbourConfig, *, quiet: bool = False) -> SafeNeighbours | None:
        """The saved neighbours of this cache and config, or None when there are none or they
        are damaged (then a one-line warning naming the file, unless ``quiet``)."""
        folder = cls.folder(cache, config)
        if not (folder / "neighbours.json").is_file():
            return None
        try:
            info = json.loads((folder / "neighbours.json").read_text())
            if not isinstance(info, dict):
                raise DamagedArtefact(folder / "neighbours.json", "not a JSON object")
            if (
                info.get("format_version") != NEIGHBOURS_FORMAT_VERSION
                or info.get("cache_key") != cache.key
                or info.get("config_hash") != config.fingerprint()
            ):
                return None
            if "checksums" not in info:
                raise DamagedArtefact(folder, "no checksums recorded (written by an older saferclip)")
            # every array verified against its digest (once per process), then its values
            verify_all(folder, info["checksums"], "saved neighbours")
            arrays = {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in _SAVED_ARRAYS}
            extra = cache.extra_safe_text is not None and config.mode == "text" and config.use_extra_pool
            pool_size = len(cache) + (len(cache.extra_safe_text) if extra else 0)
            if info.get("pool_size") != pool_size:
                raise DamagedArtefact(
                    folder / "neighbours.json",
                    f"pool_size {info.get('pool_size')!r}, the cache's pool holds {pool_size}",
                )
            _check_saved(folder, arrays, len(cache), config.k, pool_size)
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: recompute rather than trust it
            if not quiet:
                log.warning("%s; recomputing the safe neighbours", " ".join(str(e).split()))
            return None
        arrays = {n: torch.from_numpy(a) for n, a in arrays.items()}
        return cls(
            **arrays,
            config=config,
            n_set=info["n_set"],
            pool_size=info["pool_size"],
            cache_key=info["cache_key"],
            seconds=info["seconds"],
            meta=info.get("meta", {}),
        )


def _check_saved(folder: Path, arrays: dict[str, np.ndarray], n: int, k: int, pool_size: int) -> None:
    """The values a consistent neighbour folder holds; DamagedArtefact naming the file otherwise."""
    shapes = {"indices": (n, k), "similarities": (n, k), "weights": (n, k)}
    for name, arr in arrays.items():
        expected = shapes.get(name, (n,))
        if arr.shape != expected:
            raise DamagedArtefact(folder / f"{name}.npy", f"shape {arr.shape}, expected {expected}")
        check_finite(arr, folder / f"{name}.npy", "saved neighbours")
    check_index_range(arrays["indices"], pool_size, folder / "indices.npy", "saved neighbours")
    check_index_range(arrays["bucket"], 3, folder / "bucket.npy", "saved neighbours")


def pool_text(cache: EmbeddingCache, with_extra: bool = True) -> torch.Tensor:
    """The safe caption pool ``[P, D]``: the set's ``T0(S)``, then the extra captions."""
    if with_extra and cache.extra_safe_text is not None:
        return torch.cat([cache.safe_text, cache.extra_safe_text])
    return cache.safe_text


def _mode_vectors(cache: EmbeddingCache, config: NeighbourConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(queries [N, D'], pool [P, D'], n_set) in the mode's space, float32."""
    n = len(cache)
    extra = config.use_extra_pool and cache.extra_safe_text is not None
    if config.mode == "text":
        return (
            as_search_matrix(cache.unsafe_text, "unsafe captions T0(U)"),
            as_search_matrix(pool_text(cache, extra), "safe caption pool"),
            n,
        )
    if cache.safe_image is None or cache.unsafe_image is None:
        have = "safe images only" if cache.safe_image is not None else "no images"
        raise NeighbourError(
            f"mode {config.mode!r} needs safe and unsafe image embeddings; the cache {cache.key} has {have}"
        )
    if extra:
        raise NeighbourError(
            f"the extra safe pool holds captions without images; set use_extra_pool=False for mode {config.mode!r}"
        )
    g, v = (
        as_search_matrix(cache.unsafe_image, "unsafe images I0(G)"),
        as_search_matrix(cache.safe_image, "safe images I0(V)"),
    )
    if config.mode == "image":
        return g, v, n
    w = config.joint_text_weight
    u, s = (
        as_search_matrix(cache.unsafe_text, "unsafe captions T0(U)"),
        as_search_matrix(cache.safe_text, "safe captions T0(S)"),
    )
    a, b = np.float32(w**0.5), np.float32((1 - w) ** 0.5)
    return np.hstack([a * u, b * g]), np.hstack([a * s, b * v]), n


def guard_weights(
    similarities: torch.Tensor, config: NeighbourConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax weights, guard, pair weight and difficulty from ``similarities [N, k]``.

    Returns ``(weights [N, k], pair_weight [N], difficulty [N], flagged [N])``.
    """
    soft = torch.softmax(similarities.float() / config.temperature, dim=1)
    difficulty = (soft * similarities).sum(dim=1)
    keep = torch.ones_like(similarities, dtype=torch.bool)
    if config.min_similarity is not None:
        keep = similarities >= config.min_similarity
    weights = soft * keep
    total = weights.sum(dim=1, keepdim=True)
    flagged = total.squeeze(1) == 0
    weights = torch.where(total > 0, weights / total.clamp_min(1e-30), torch.zeros_like(weights))
    pair_weight = (~flagged).float()
    if config.weight_by_similarity:
        pair_weight = pair_weight * (weights * similarities).sum(dim=1).clamp(0.0, 1.0)
    return weights, pair_weight, difficulty, flagged


def difficulty_buckets(difficulty: torch.Tensor, n_buckets: int = 3) -> torch.Tensor:
    """``[N]`` -> bucket ``[N]``: equal parts by descending similarity (0 = easiest); ties by position."""
    order = np.argsort(-difficulty.numpy(), kind="stable")
    bucket = np.empty(len(order), dtype=np.int64)
    for b, part in enumerate(np.array_split(order, n_buckets)):
        bucket[part] = b
    return torch.from_numpy(bucket)


def find_safe_neighbours(
    cache: EmbeddingCache, config: NeighbourConfig | None = None, groups: ItemGroups | None = None
) -> SafeNeighbours:
    """Map every unsafe item of the cache to its ``k`` closest safe alternatives (no file written).
    ``groups`` (:func:`item_groups`) are needed by ``config.sparse_share > 0`` only."""
    config = config or NeighbourConfig()
    t0 = time.perf_counter()
    queries, pool, n_set = _mode_vectors(cache, config)
    check_search_shapes(queries, pool, config.k)
    idx = make_index(pool, config.search_settings())
    keep = sparse_filter(config, len(queries), len(pool), groups)
    ids, sims = search_filtered(idx, queries, config.k, len(pool), keep)
    similarities = torch.from_numpy(sims)
    weights, pair_weight, difficulty, flagged = guard_weights(similarities, config)
    meta: dict[str, Any] = {}
    if config.fallback == "own_pair" and bool(flagged.any()):
        ids, weights, pair_weight = own_pair_fallback(ids, weights, pair_weight, flagged)
        meta["own_pair_fallback"] = int(flagged.sum())
        log.info(
            "%d of %d items have no neighbour above %.2f: their own paired safe item is their target",
            int(flagged.sum()),
            len(flagged),
            config.min_similarity,
        )
    seconds = time.perf_counter() - t0
    log.info(
        "safe neighbours (%s, %s, k=%d) of %d items in a pool of %d: %.2fs",
        config.mode,
        config.index,
        config.k,
        len(queries),
        len(pool),
        seconds,
    )
    return SafeNeighbours(
        indices=torch.from_numpy(ids),
        similarities=similarities,
        weights=weights,
        pair_weight=pair_weight,
        difficulty=difficulty,
        bucket=difficulty_buckets(difficulty),
        flagged=flagged,
        config=config,
        n_set=n_set,
        pool_size=len(pool),
        cache_key=cache.key,
        seconds=seconds,
        meta=meta,
    )


def own_pair_fallback(
    ids: np.ndarray, weights: torch.Tensor, pair_weight: torch.Tensor, flagged: torch.Tensor
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The flagged items' targets become their own paired safe items (pool position = item
    index: the pool starts with the set's safe items in order), with full weight. ``flagged``
    stays as it was: it still says which items had no trustworthy neighbour."""
    rows = torch.nonzero(flagged).flatten()
    ids = ids.copy()
    ids[rows.numpy(), 0] = rows.numpy()
    weights, pair_weight = weights.clone(), pair_weight.clone()
    weights[rows] = 0.0
    weights[rows, 0] = 1.0
    pair_weight[rows] = 1.0
    return ids, weights, pair_weight


def load_or_find_safe_neighbours(
    cache: EmbeddingCache, config: NeighbourConfig | None = None, groups: ItemGroups | None = None
) -> SafeNeighbours:
    """:func:`find_safe_neighbours`, reusing (and otherwise saving) the result beside the cache."""
    config = config or NeighbourConfig()
    found = SafeNeighbours.load(cache, config)
    if found is not None:
        return found
    # one search per cache and config: a second process sharing the cache waits, then reuses it
    with file_lock(SafeNeighbours.folder(cache, config).parent / f".{config.fingerprint()}.lock"):
        found = SafeNeighbours.load(cache, config, quiet=True)  # warned about above
        if found is not None:
            return found
        remove_leftovers(SafeNeighbours.folder(cache, config))  # of a search killed earlier
        found = find_safe_neighbours(cache, config, groups)
        found.save(cache)
    return found

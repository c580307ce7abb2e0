"""Realistic, sparse safe pools (docs/METHOD.md, "Finding the targets"): real pools rarely hold
a caption of the very same scene, so for a share of the unsafe items every pool item of the
same group (the same toy scene, or the same safe image) is kept out of their candidates.

:func:`sparse_filter` builds the :class:`CandidateFilter` of a neighbour config,
:func:`item_groups` the groups it compares, and the filtered search asks FAISS for more
candidates until each query has ``k`` valid ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.records import QuadrupletSet
from .faiss_search import NeighbourError
from .neighbour_config import SCENE_KEY, SPARSE_GROUPS, NeighbourConfig

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)


@dataclass
class CandidateFilter:
    """Which pool items each query may not take (beyond its top-k by similarity).

    ``exclude_own``: query ``i`` never takes pool item ``i`` (its own pair); ``ceiling``: no
    candidate above this similarity (near-duplicates); ``pool_kept [P]`` bool: only these pool
    items exist; ``query_group [Q]`` / ``pool_group [P]`` int: a query never takes a pool item
    of its own group (-1 = no group, blocks nothing).
    """

    exclude_own: bool = False
    ceiling: float | None = None
    pool_kept: np.ndarray | None = None
    query_group: np.ndarray | None = None
    pool_group: np.ndarray | None = None

    def valid(self, queries: np.ndarray, ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """``[q, w]`` bool: which candidates ``ids`` (with similarities ``sims``) of ``queries`` are allowed."""
        valid = ids >= 0
        safe_ids = np.where(valid, ids, 0)
        if self.exclude_own:
            valid &= ids != queries[:, None]
        if self.ceiling is not None:
            valid &= sims <= self.ceiling
        if self.pool_kept is not None:
            valid &= self.pool_kept[safe_ids]
        if self.query_group is not None:
            group = self.query_group[queries][:, None]
            valid &= (group < 0) | (self.pool_group[safe_ids] != group)
        return valid

    def describe(self) -> str:
        parts = [
            ("its own pair", self.exclude_own),
            (f"near-duplicates above {self.ceiling}", self.ceiling is not None),
        ]
        parts += [("the dropped part of the pool", self.pool_kept is not None)]
        parts += [("every safe item of its own group", self.query_group is not None)]
        return " and ".join(w for w, on in parts if on) or "nothing"

    @property
    def margin(self) -> int:
        """Extra candidates to fetch in the first search, before widening."""
        return (
            int(self.exclude_own) + (8 if self.ceiling is not None else 0) + (32 if self.query_group is not None else 0)
        )


def search_filtered(
    idx: faiss.Index, queries: np.ndarray, k: int, pool_size: int, keep: CandidateFilter
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every query among the candidates ``keep`` allows.

    Searches k plus a margin and widens (x4) for the queries that lost too many candidates,
    up to the whole pool; a query still short of k valid candidates is an error.
    """
    n = len(queries)
    out_i = np.empty((n, k), dtype=np.int64)
    out_s = np.empty((n, k), dtype=np.float32)
    todo = np.arange(n)
    kept = pool_size if keep.pool_kept is None else max(int(keep.pool_kept.sum()), 1)
    width = min(pool_size, int(np.ceil((k + keep.margin) * pool_size / kept)))
    while len(todo):
        sims, ids = idx.search(queries[todo], width)
        valid = keep.valid(todo, ids, sims)
        done = valid.sum(axis=1) >= k
        first = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # first k valid, order kept
        rows = todo[done]
        out_i[rows] = np.take_along_axis(ids, first, axis=1)[done]
        out_s[rows] = np.take_along_axis(sims, first, axis=1)[done]
        todo = todo[~done]
        if len(todo) and width >= pool_size:
            raise NeighbourError(
                f"{len(todo)} items (first: item {int(todo[0])}) have fewer than k={k} safe candidates left "
                f"after excluding {keep.describe()} (pool of {pool_size}); lower k or relax the guard"
            )
        width = min(pool_size, width * 4)
    return out_i, out_s


def config_groups(qset: QuadrupletSet, config: NeighbourConfig, pool_size: int) -> ItemGroups | None:
    """The groups ``config`` needs (None unless ``sparse_share > 0``)."""
    if config.sparse_share <= 0:
        return None
    return item_groups(qset, config.sparse_group, pool_size, config.sparse_attributes)


@dataclass
class ItemGroups:
    """Group ids for the sparse-pool option: ``query [N]`` of each unsafe item, ``pool [P]`` of
    each safe pool item (-1: no group). Built by :func:`item_groups`."""

    query: np.ndarray
    pool: np.ndarray


def item_groups(
    qset: QuadrupletSet, by: str = "scene", pool_size: int | None = None, attributes: tuple[str, ...] | None = None
) -> ItemGroups:
    """Which safe pool items show "the same thing" as each unsafe item.

    ``scene``: the toy world's truth, ``meta["nsfw_scene"]`` of the unsafe item and
    ``meta["safe_scene"]`` of each safe item, compared on ``attributes`` (default: shape,
    colour, size and background; a set without scenes is an error). ``image``: the same safe image file (real data: the
    other captions of the unsafe caption's own COCO image). Extra pool captions (positions
    ``len(qset) ..< pool_size``) belong to no group.
    """
    if by not in SPARSE_GROUPS:
        raise NeighbourError(f"unknown grouping {by!r}; expected one of {SPARSE_GROUPS}")
    keys: dict[Any, int] = {}

    def group(key: Any) -> int:
        return keys.setdefault(key, len(keys)) if key is not None else -1

    queries, pool = [], []
    for i, q in enumerate(qset):
        if by == "scene":
            unsafe, safe = q.meta.get("nsfw_scene"), q.meta.get("safe_scene")
            if not isinstance(unsafe, dict) or not isinstance(safe, dict):
                raise NeighbourError(
                    f"{qset.source}: item {i} has no scene description (meta nsfw_scene / safe_scene); "
                    "sparse_group=scene needs the toy world; use sparse_group=image for real data"
                )
            queries.append(group(_scene_key(unsafe, attributes or SCENE_KEY)))
            pool.append(group(_scene_key(safe, attributes or SCENE_KEY)))
        else:
            image = None if q.safe_image is None else str(q.safe_image)
            if image is None:
                raise NeighbourError(f"{qset.source}: item {i} has no safe image; sparse_group=image needs them")
            queries.append(group(image))
            pool.append(group(image))
    extra = max(0, (pool_size or len(qset)) - len(qset))
    return ItemGroups(np.asarray(queries, dtype=np.int64), np.asarray(pool + [-1] * extra, dtype=np.int64))


def _scene_key(scene: dict, attributes: tuple[str, ...]) -> tuple:
    return tuple(scene.get(a) for a in attributes)


def sparse_filter(
    config: NeighbourConfig, n_queries: int, pool_size: int, groups: ItemGroups | None
) -> CandidateFilter:
    """The candidate filter of ``config``: own pair, near-duplicates, and the sparse pool."""
    rng = np.random.default_rng(config.pool_seed)
    keep = CandidateFilter(
        exclude_own=config.exclude_own_pair,
        ceiling=config.max_similarity if config.exclude_near_duplicates else None,
    )
    if config.pool_keep_fraction < 1.0:
        kept = np.zeros(pool_size, dtype=bool)
        kept[rng.permutation(pool_size)[: max(1, round(config.pool_keep_fraction * pool_size))]] = True
        keep.pool_kept = kept
    if config.sparse_share > 0:
        if groups is None:
            raise NeighbourError("sparse_share > 0 needs the items' groups (item_groups(qset, sparse_group))")
        if len(groups.query) != n_queries or len(groups.pool) != pool_size:
            raise NeighbourError(
                f"groups for {len(groups.query)} items and a pool of {len(groups.pool)}, "
                f"but there are {n_queries} items and a pool of {pool_size}"
            )
        chosen = rng.permutation(n_queries)[: round(config.sparse_share * n_queries)]
        query_group = np.full(n_queries, -1, dtype=np.int64)
        query_group[chosen] = groups.query[chosen]
        keep.query_group, keep.pool_group = query_group, groups.pool
    return keep

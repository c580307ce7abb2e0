"""How unsafe items find their safe targets: :class:`NeighbourConfig`, the ``method.neighbours``
section of a preset, checked when built.

A leaf: it imports only the FAISS search's settings (:mod:`.faiss_search`), so the neighbour
search (:mod:`.neighbours`) and the sparse pools (:mod:`.sparse_pools`) both take it from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .faiss_search import INDEX_TYPES, NeighbourError, SearchSettings

MODES = ("text", "image", "joint")
FALLBACKS = (None, "own_pair")
SPARSE_GROUPS = ("scene", "image")  # what "the same thing" is for the sparse-pool option
SCENE_KEY = ("shape", "colour", "size", "background")  # the toy scene's attributes


@dataclass
class NeighbourConfig:
    """How unsafe items find their safe targets. Defaults are the paper's (text mode, k=1)."""

    mode: str = "text"  # text: T0(U) vs T0(S); image: I0(G) vs I0(V); joint: see joint_text_weight
    k: int = 1
    temperature: float = 0.01  # softmax(similarity / temperature) over the top k; CLIP's logit scale 100
    # joint mode ranks by  w * cos_text + (1 - w) * cos_image : the weighted *sum* of the two
    # cosines, computed exactly as the inner product of the concatenated vectors
    # [sqrt(w) T0, sqrt(1 - w) I0], so FAISS searches it like any other space
    joint_text_weight: float = 0.5
    use_extra_pool: bool = True  # add the cache's extra safe captions to the pool (text mode)
    # the FAISS search (SearchSettings: the one declaration of these knobs and their defaults)
    index: str = SearchSettings.index
    device: str = SearchSettings.device
    nlist: int | None = SearchSettings.nlist
    nprobe: int = SearchSettings.nprobe
    hnsw_m: int = SearchSettings.hnsw_m
    ef_construction: int = SearchSettings.ef_construction
    ef_search: int = SearchSettings.ef_search
    # the neighbour-quality guard (docs/METHOD.md, "Finding the targets")
    min_similarity: float | None = None  # candidates below get weight 0; items with none left are flagged
    weight_by_similarity: bool = False  # pair_weight *= clamp(weighted neighbour similarity, 0, 1)
    exclude_near_duplicates: bool = False  # drop candidates above max_similarity (exact / minimal edits)
    max_similarity: float = 0.98
    exclude_own_pair: bool = False  # never choose the item's own paired safe item
    # what an item whose every candidate fails min_similarity gets: null: no target (pair
    # weight 0, the item only learns through the others); own_pair: its own paired safe item,
    # the rewrite every real unsafe item comes with (a SafeR-CLIP / Safe-CLIP hybrid)
    fallback: str | None = None
    # realistic, sparse pools: real safe pools rarely hold a caption of the very same scene
    pool_keep_fraction: float = 1.0  # keep this random share of the safe pool (seeded by pool_seed)
    sparse_share: float = 0.0  # for this share of unsafe items, every pool item of the same group is removed
    sparse_group: str = "scene"  # scene: the same scene (toy-world truth); image: the same safe image
    # the scene attributes that make two scenes "the same" for sparse_group=scene
    sparse_attributes: tuple[str, ...] = ("shape", "colour", "size", "background")
    pool_seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NeighbourError(f"unknown neighbour mode {self.mode!r}; expected one of {MODES}")
        if self.index not in INDEX_TYPES:
            raise NeighbourError(f"unknown index type {self.index!r}; expected one of {INDEX_TYPES}")
        if not isinstance(self.k, int) or self.k < 1:
            raise NeighbourError(f"k must be a positive integer, got {self.k!r}")
        if not self.temperature > 0:
            raise NeighbourError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.joint_text_weight <= 1.0:
            raise NeighbourError(f"joint_text_weight must be in [0, 1], got {self.joint_text_weight}")
        if not 0.0 < self.pool_keep_fraction <= 1.0:
            raise NeighbourError(f"pool_keep_fraction must be in (0, 1], got {self.pool_keep_fraction}")
        if not 0.0 <= self.sparse_share <= 1.0:
            raise NeighbourError(f"sparse_share must be in [0, 1], got {self.sparse_share}")
        self.sparse_attributes = tuple(self.sparse_attributes)
        if not self.sparse_attributes or set(self.sparse_attributes) - set(SCENE_KEY):
            raise NeighbourError(
                f"sparse_attributes must be a non-empty subset of {SCENE_KEY}, got {list(self.sparse_attributes)}"
            )
        if self.sparse_group not in SPARSE_GROUPS:
            raise NeighbourError(f"unknown sparse_group {self.sparse_group!r}; expected one of {SPARSE_GROUPS}")
        if self.fallback not in FALLBACKS:
            raise NeighbourError(f"unknown fallback {self.fallback!r}; expected one of {list(FALLBACKS)} (null: none)")
        if self.fallback is not None and self.min_similarity is None:
            raise NeighbourError(
                f"fallback={self.fallback} replaces the targets min_similarity rejects; set min_similarity too"
            )
        if self.fallback == "own_pair" and self.exclude_own_pair:
            raise NeighbourError("fallback=own_pair contradicts exclude_own_pair=true")
        if (
            self.exclude_near_duplicates
            and self.min_similarity is not None
            and self.min_similarity >= self.max_similarity
        ):
            raise NeighbourError(
                f"min_similarity {self.min_similarity} must be below max_similarity {self.max_similarity}"
            )

    def search_settings(self) -> SearchSettings:
        return SearchSettings(
            self.index, self.device, self.nlist, self.nprobe, self.hnsw_m, self.ef_construction, self.ef_search
        )

    def fingerprint(self) -> str:
        """Hash of every field that changes the result (``device`` does not)."""
        fields = {k: v for k, v in asdict(self).items() if k != "device"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

"""Safe-neighbour search: each unsafe item's closest safe alternatives (docs/METHOD.md, "Finding the targets").

Two layers:

- :func:`build_neighbour_index` — top-k inner-product search of ``queries [Q, D]`` in
  ``pool [P, D]`` with FAISS: ``exact`` (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, tuned by
  ``nlist`` / ``nprobe``) or ``hnsw`` (``IndexHNSWFlat``, tuned by ``hnsw_m`` / ``ef_search``);
  on a FAISS GPU when one is present and ``device`` allows. Embeddings are L2-normalised, so
  inner product = cosine. :func:`exact_neighbours_torch` is the plain matmul + topk reference.
- :func:`find_safe_neighbours` — SafeR-CLIP's targets from an :class:`EmbeddingCache`:
  neighbour mode, top-k softmax weights, the neighbour-quality guard, per-pair difficulty and
  curriculum buckets, in a :class:`SafeNeighbours` that saves itself beside the cache.

Reports (``summarize``, the toy world's ``attribute_agreement``) live in
:mod:`saferclip.redirection.report`.

Pool positions: ``0 .. n_set-1`` are the set's own safe items (position ``i`` = item ``i``);
``n_set ..`` are the extra safe captions of the cache (text mode only; they have no image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import faiss


def _faiss():
    """FAISS, imported on first use: so that a command can choose its BLAS kernels first
    (:func:`saferclip.app.cli.prefer_fast_openblas`), and importing saferclip stays quick."""
    import faiss

    return faiss

from ..data.records import QuadrupletSet
from ..errors import SaferclipError
from ..files import atomic_folder, file_lock, remove_leftovers, write_json_atomic
from ..integrity import DamagedArtefact, check_finite, check_index_range, digests, verify_all
from .cache import EmbeddingCache

log = logging.getLogger(__name__)

INDEX_TYPES = ("exact", "ivf", "hnsw")
MODES = ("text", "image", "joint")
SPARSE_GROUPS = ("scene", "image")
NEIGHBOURS_FORMAT_VERSION = 1
_SAVED_ARRAYS = ("indices", "similarities", "weights", "pair_weight", "difficulty", "bucket", "flagged")


class NeighbourError(SaferclipError):
    """Bad input to the neighbour search: shapes, sizes, non-finite values, unknown options."""


@dataclass
class NeighbourResult:
    """Top-k of every query: pool positions ``indices [Q, k]`` (int64) and cosines ``similarities [Q, k]``."""

    indices: torch.Tensor
    similarities: torch.Tensor
    build_seconds: float = 0.0  # index construction (IVF training, HNSW graph); 0 for exact
    search_seconds: float = 0.0
    index: str = "exact"
    device: str = "cpu"


# ----------------------------------------------------------------------------- low level
def _as_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """float32, C-contiguous ``[n, d]`` numpy (what FAISS wants), with a finite check naming the row."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise NeighbourError(f"{name} must be a 2-d [n, d] matrix, got shape {tuple(x.shape)}")
    for start in range(0, len(x), 65536):  # in blocks: a [1M, 768] bool mask would be another 768 MB
        finite = np.isfinite(x[start : start + 65536]).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise NeighbourError(f"{name} has non-finite (NaN/inf) values in {len(rows)} rows, first row {int(rows[0])}")
    return x


def _check_shapes(queries: np.ndarray, pool: np.ndarray, k: int) -> None:
    if pool.shape[0] == 0:
        raise NeighbourError("the safe pool is empty: nothing to search")
    if queries.shape[1] != pool.shape[1]:
        raise NeighbourError(f"dimension mismatch: queries are {queries.shape[1]}-d, the pool is {pool.shape[1]}-d")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise NeighbourError(f"k must be a positive integer, got {k!r}")
    if k > pool.shape[0]:
        raise NeighbourError(f"k={k} is larger than the pool ({pool.shape[0]} items)")


def _use_gpu(device: str) -> bool:
    faiss = _faiss()
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cpu":
        return False
    if device == "auto":
        return n_gpus > 0
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        if n_gpus == 0:
            raise NeighbourError(f"device={device!r} but FAISS sees no GPU (faiss-cpu installed?); use 'cpu' or 'auto'")
        return True
    raise NeighbourError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def default_nlist(pool_size: int) -> int:
    """IVF lists: about sqrt(P), and at least 39 training points per list (FAISS's own minimum)."""
    return int(max(1, min(round(pool_size**0.5), pool_size // 39)))


def make_index(
    pool: torch.Tensor | np.ndarray,
    index: str = "exact",
    device: str = "auto",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
    seed: int = 0,
) -> "faiss.Index":
    """A FAISS inner-product index over ``pool [P, D]``, trained, filled and ready to search."""
    if index not in INDEX_TYPES:
        raise NeighbourError(f"unknown index type {index!r}; expected one of {INDEX_TYPES}")
    pool = _as_matrix(pool, "pool")
    n, d = pool.shape
    if n == 0:
        raise NeighbourError("the safe pool is empty: nothing to search")
    gpu = _use_gpu(device)
    faiss = _faiss()
    if index == "exact":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise NeighbourError(f"nlist must be in [1, pool size {n}], got {nlist}")
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = seed
        idx.nprobe = min(int(nprobe), nlist)
    else:
        idx = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = int(ef_construction)
        idx.hnsw.efSearch = int(ef_search)
    if gpu and index != "hnsw":  # FAISS has no GPU HNSW; it stays on the CPU
        idx = _to_gpu(idx)
    if index == "ivf":
        # k-means on a sample: 64 points per list is plenty, and the whole of 1M x 768 is slow
        train = pool
        if n > 64 * nlist:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=64 * nlist, replace=False))
            train = pool[rows]
        idx.train(train)
    idx.add(pool)
    return idx


def _to_gpu(idx: "faiss.Index") -> "faiss.Index":  # pragma: no cover - needs faiss-gpu and a GPU
    faiss = _faiss()
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, idx)
    gpu_index.saferclip_resources = res  # keep the resources alive as long as the index
    return gpu_index


def build_neighbour_index(
    queries: torch.Tensor | np.ndarray,
    pool: torch.Tensor | np.ndarray,
    k: int = 1,
    index: str = "exact",
    device: str = "auto",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
    seed: int = 0,
) -> NeighbourResult:
    """Top-``k`` pool items of every query by inner product (cosine for normalised rows).

    Args:
        queries: ``[Q, D]``; pool: ``[P, D]``; both L2-normalised for cosine similarity.
        index: ``"exact"``; ``"ivf"`` (``nlist`` lists, default ~sqrt(P); ``nprobe`` searched);
            ``"hnsw"`` (``hnsw_m`` links per node, ``ef_construction``, ``ef_search``).
        device: ``"auto"`` (FAISS GPU when present), ``"cpu"`` or ``"cuda"``.

    Returns:
        ``NeighbourResult(indices [Q, k] int64, similarities [Q, k] float32)``, best first.
    """
    q = _as_matrix(queries, "queries")
    p = _as_matrix(pool, "pool")
    _check_shapes(q, p, k)
    t0 = time.perf_counter()
    idx = make_index(p, index, device, nlist, nprobe, hnsw_m, ef_construction, ef_search, seed)
    t1 = time.perf_counter()
    sims, ids = idx.search(q, int(k))
    t2 = time.perf_counter()
    if (ids < 0).any():
        missing = int((ids < 0).any(axis=1).sum())
        raise NeighbourError(
            f"the {index} index found fewer than k={k} neighbours for {missing} queries; raise nprobe / ef_search or use index='exact'"
        )
    return NeighbourResult(
        indices=torch.from_numpy(ids.astype(np.int64)),
        similarities=torch.from_numpy(sims),
        build_seconds=(t1 - t0) if index != "exact" else 0.0,
        search_seconds=(t2 - t1) + ((t1 - t0) if index == "exact" else 0.0),
        index=index,
        device="cuda" if _use_gpu(device) and index != "hnsw" else "cpu",
    )


@torch.no_grad()
def exact_neighbours_torch(
    queries: torch.Tensor, pool: torch.Tensor, k: int = 1, chunk: int = 4096, device: str | torch.device = "cpu"
) -> NeighbourResult:
    """Reference: ``queries @ pool.T`` + ``topk``, in query chunks. ``[Q, D]``, ``[P, D]`` -> ``[Q, k]``.

    ``device="cuda"`` runs it on a GPU (the exact search where no FAISS GPU build is
    installed); the time then includes copying the pool there and the results back. The
    results are on the CPU either way."""
    q = torch.as_tensor(_as_matrix(queries, "queries"))
    p = torch.as_tensor(_as_matrix(pool, "pool"))
    _check_shapes(q.numpy(), p.numpy(), k)
    device = torch.device(device)
    t0 = time.perf_counter()
    p = p.to(device)
    sims, ids = [], []
    for start in range(0, len(q), chunk):
        s, i = (q[start : start + chunk].to(device) @ p.T).topk(k, dim=1)
        sims.append(s.cpu())
        ids.append(i.cpu())  # .cpu() waits for the GPU: the clock below is honest
    out_s = torch.cat(sims) if sims else torch.empty(0, k)
    out_i = torch.cat(ids) if ids else torch.empty(0, k, dtype=torch.int64)
    return NeighbourResult(
        out_i, out_s, search_seconds=time.perf_counter() - t0, index="torch", device=str(device.type)
    )


# distributions that install the ``faiss`` module with GPU support (same import name as faiss-cpu)
FAISS_GPU_DISTRIBUTIONS = ("faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-cuda", "faiss-cuda-cu128")


def faiss_gpu_status() -> dict[str, Any]:
    """What the loaded FAISS can do on a GPU, and why not when it cannot.

    Returns ``{"faiss_version", "distributions" {name: version}, "gpu_build" (the loaded
    module has GPU code), "gpus" (GPUs FAISS sees), "usable" (gpu_build and gpus > 0),
    "note"}``. faiss-cpu and every GPU build install the same ``faiss`` package folder, so
    with both installed the files of whichever pip installed last are loaded: the note says
    so, and how to put the GPU build back.
    """
    from importlib import metadata

    faiss = _faiss()
    dists = {}
    for name in ("faiss-cpu", *FAISS_GPU_DISTRIBUTIONS):
        try:
            dists[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    gpu_build = hasattr(faiss, "StandardGpuResources")
    gpus = int(faiss.get_num_gpus()) if gpu_build and hasattr(faiss, "get_num_gpus") else 0
    gpu_dists = [n for n in dists if n != "faiss-cpu"]
    if gpu_build and gpus > 0:
        note = f"FAISS GPU build, {gpus} GPU(s)"
    elif gpu_build:
        note = "FAISS GPU build, but it sees no GPU (no driver, or its CUDA runtime does not load)"
    elif gpu_dists:
        name = gpu_dists[0]
        note = (
            f"{name} {dists[name]} is installed but the loaded faiss is a CPU build: faiss-cpu's files "
            f"overwrote it (both install the same 'faiss' folder). Fix: pip install --force-reinstall "
            f"--no-deps {name}=={dists[name]}"
        )
    else:
        note = "no FAISS GPU build installed (optional; see the README's GPU section)"
    return {
        "faiss_version": getattr(faiss, "__version__", "unknown"),
        "distributions": dists,
        "gpu_build": gpu_build,
        "gpus": gpus,
        "usable": gpu_build and gpus > 0,
        "note": note,
    }


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
        parts = [("its own pair", self.exclude_own), (f"near-duplicates above {self.ceiling}", self.ceiling is not None)]
        parts += [("the dropped part of the pool", self.pool_kept is not None)]
        parts += [("every safe item of its own group", self.query_group is not None)]
        return " and ".join(w for w, on in parts if on) or "nothing"

    @property
    def margin(self) -> int:
        """Extra candidates to fetch in the first search, before widening."""
        return int(self.exclude_own) + (8 if self.ceiling is not None else 0) + (32 if self.query_group is not None else 0)


def _search_filtered(
    idx: "faiss.Index", queries: np.ndarray, k: int, pool_size: int, keep: CandidateFilter
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


def config_groups(qset: QuadrupletSet, config: "NeighbourConfig", pool_size: int) -> ItemGroups | None:
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


SCENE_KEY = ("shape", "colour", "size", "background")


def _scene_key(scene: dict, attributes: tuple[str, ...]) -> tuple:
    return tuple(scene.get(a) for a in attributes)


def sparse_filter(config: NeighbourConfig, n_queries: int, pool_size: int, groups: ItemGroups | None) -> CandidateFilter:
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


# ----------------------------------------------------------------------------- safe neighbours
FALLBACKS = (None, "own_pair")


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
    index: str = "exact"
    device: str = "auto"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
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
            raise NeighbourError(f"sparse_attributes must be a non-empty subset of {SCENE_KEY}, got {list(self.sparse_attributes)}")
        if self.sparse_group not in SPARSE_GROUPS:
            raise NeighbourError(f"unknown sparse_group {self.sparse_group!r}; expected one of {SPARSE_GROUPS}")
        if self.fallback not in FALLBACKS:
            raise NeighbourError(f"unknown fallback {self.fallback!r}; expected one of {list(FALLBACKS)} (null: none)")
        if self.fallback is not None and self.min_similarity is None:
            raise NeighbourError(f"fallback={self.fallback} replaces the targets min_similarity rejects; set min_similarity too")
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

    def fingerprint(self) -> str:
        """Hash of every field that changes the result (``device`` does not)."""
        fields = {k: v for k, v in asdict(self).items() if k != "device"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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
                raise DamagedArtefact(folder / "neighbours.json", f"pool_size {info.get('pool_size')!r}, the cache's pool holds {pool_size}")
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
            _as_matrix(cache.unsafe_text, "unsafe captions T0(U)"),
            _as_matrix(pool_text(cache, extra), "safe caption pool"),
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
    g, v = _as_matrix(cache.unsafe_image, "unsafe images I0(G)"), _as_matrix(cache.safe_image, "safe images I0(V)")
    if config.mode == "image":
        return g, v, n
    w = config.joint_text_weight
    u, s = _as_matrix(cache.unsafe_text, "unsafe captions T0(U)"), _as_matrix(cache.safe_text, "safe captions T0(S)")
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
    _check_shapes(queries, pool, config.k)
    idx = make_index(
        pool, config.index, config.device, config.nlist, config.nprobe, config.hnsw_m, ef_search=config.ef_search
    )
    keep = sparse_filter(config, len(queries), len(pool), groups)
    ids, sims = _search_filtered(idx, queries, config.k, len(pool), keep)
    similarities = torch.from_numpy(sims)
    weights, pair_weight, difficulty, flagged = guard_weights(similarities, config)
    meta: dict[str, Any] = {}
    if config.fallback == "own_pair" and bool(flagged.any()):
        ids, weights, pair_weight = own_pair_fallback(ids, weights, pair_weight, flagged)
        meta["own_pair_fallback"] = int(flagged.sum())
        log.info("%d of %d items have no neighbour above %.2f: their own paired safe item is their target",
                 int(flagged.sum()), len(flagged), config.min_similarity)
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

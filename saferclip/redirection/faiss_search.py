"""FAISS top-k inner-product search: ``queries [Q, D]`` in ``pool [P, D]`` (docs/METHOD.md,
"Finding the targets").

:func:`build_neighbour_index` searches with ``exact`` (``IndexFlatIP``), ``ivf``
(``IndexIVFFlat``, tuned by ``nlist`` / ``nprobe``) or ``hnsw`` (``IndexHNSWFlat``, tuned by
``hnsw_m`` / ``ef_search``), on a FAISS GPU when one is present and ``device`` allows.
Embeddings are L2-normalised, so inner product = cosine. :func:`exact_neighbours_torch` is the
plain matmul + topk reference; :func:`faiss_gpu_status` says which FAISS build is loaded. What
the search is *for* (an unsafe item's safe targets) is :mod:`saferclip.redirection.neighbours`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import faiss

from ..errors import SaferclipError


def load_faiss():
    """FAISS, imported on first use: so that a command can choose its BLAS kernels first
    (:func:`saferclip.app.cli.prefer_fast_openblas`), and importing saferclip stays quick."""
    import faiss

    return faiss


log = logging.getLogger(__name__)

INDEX_TYPES = ("exact", "ivf", "hnsw")


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
def as_search_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
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
            raise NeighbourError(
                f"{name} has non-finite (NaN/inf) values in {len(rows)} rows, first row {int(rows[0])}"
            )
    return x


def check_search_shapes(queries: np.ndarray, pool: np.ndarray, k: int) -> None:
    if pool.shape[0] == 0:
        raise NeighbourError("the safe pool is empty: nothing to search")
    if queries.shape[1] != pool.shape[1]:
        raise NeighbourError(f"dimension mismatch: queries are {queries.shape[1]}-d, the pool is {pool.shape[1]}-d")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise NeighbourError(f"k must be a positive integer, got {k!r}")
    if k > pool.shape[0]:
        raise NeighbourError(f"k={k} is larger than the pool ({pool.shape[0]} items)")


def _use_gpu(device: str) -> bool:
    faiss = load_faiss()
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


@dataclass(frozen=True)
class SearchSettings:
    """Every knob of the FAISS search, declared once (the neighbour config, the oracle and the
    benchmarks all build one): the index type and where it runs, IVF's ``nlist`` (None:
    ~sqrt(pool)) and ``nprobe``, HNSW's ``hnsw_m`` links per node, ``ef_construction`` and
    ``ef_search``."""

    index: str = "exact"
    device: str = "auto"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.index not in INDEX_TYPES:
            raise NeighbourError(f"unknown index type {self.index!r}; expected one of {INDEX_TYPES}")


def make_index(pool: torch.Tensor | np.ndarray, settings: SearchSettings | None = None, seed: int = 0) -> faiss.Index:
    """A FAISS inner-product index over ``pool [P, D]``, trained, filled and ready to search."""
    settings = settings or SearchSettings()
    index, device, nlist, nprobe = settings.index, settings.device, settings.nlist, settings.nprobe
    hnsw_m, ef_construction, ef_search = settings.hnsw_m, settings.ef_construction, settings.ef_search
    pool = as_search_matrix(pool, "pool")
    n, d = pool.shape
    if n == 0:
        raise NeighbourError("the safe pool is empty: nothing to search")
    gpu = _use_gpu(device)
    faiss = load_faiss()
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


def _to_gpu(idx: faiss.Index) -> faiss.Index:  # pragma: no cover - needs faiss-gpu and a GPU
    faiss = load_faiss()
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, idx)
    gpu_index.saferclip_resources = res  # keep the resources alive as long as the index
    return gpu_index


def build_neighbour_index(
    queries: torch.Tensor | np.ndarray,
    pool: torch.Tensor | np.ndarray,
    k: int = 1,
    settings: SearchSettings | None = None,
    seed: int = 0,
    **fields: Any,
) -> NeighbourResult:
    """Top-``k`` pool items of every query by inner product (cosine for normalised rows).

    Args:
        queries: ``[Q, D]``; pool: ``[P, D]``; both L2-normalised for cosine similarity.
        settings: the :class:`SearchSettings` (default: exact, on a FAISS GPU when present);
            ``fields`` set some of them instead (``index="ivf", nprobe=32, device="cpu"``).

    Returns:
        ``NeighbourResult(indices [Q, k] int64, similarities [Q, k] float32)``, best first.
    """
    q = as_search_matrix(queries, "queries")
    p = as_search_matrix(pool, "pool")
    check_search_shapes(q, p, k)
    t0 = time.perf_counter()
    if settings is not None and fields:
        raise TypeError("pass either settings or its fields, not both")
    settings = settings or SearchSettings(**fields)
    index, device = settings.index, settings.device
    idx = make_index(p, settings, seed)
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
    q = torch.as_tensor(as_search_matrix(queries, "queries"))
    p = torch.as_tensor(as_search_matrix(pool, "pool"))
    check_search_shapes(q.numpy(), p.numpy(), k)
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

    faiss = load_faiss()
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

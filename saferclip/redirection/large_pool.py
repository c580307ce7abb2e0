"""A safe caption pool of millions, already embedded: read from disk in chunks, searched by IVF-PQ
with exact re-ranking (docs/METHOD.md, "Finding the targets").

The pool is clip-retrieval's layout (``clip-retrieval inference`` writes it): a folder with
``text_emb/text_emb_<i>.npy`` ``[n_i, D]`` float16/float32 shards (L2-normalised) and, for the
captions, ``metadata/metadata_<i>.parquet`` with a ``caption`` column and ``n_i`` rows (a flat
folder of ``*.npy`` + ``*.parquet`` also works). Shards are opened as memory maps: no step
holds every vector in memory.

- :func:`open_pool` (:mod:`saferclip.redirection.pool_shards`) checks the layout (one-line
  errors naming the file) and returns a :class:`PoolShards` (rows across shards, chunks,
  captions of chosen rows).
- :func:`build_pool_index` trains an IVF-PQ index on a sample (coarse k-means, then product
  quantisation of the residuals), assigns every vector to its list (one BLAS product with the
  centroids per chunk) and adds the pool chunk by chunk, each chunk checked for NaNs and
  non-unit vectors. In memory and on disk it costs ``m·nbits/8`` bytes of code (32) plus an
  8-byte id per vector; the float vectors stay in the shards, the re-ranking store (no copy is
  written). :class:`BuildStages` collects the seconds of each stage.
- :class:`PoolIndex` ``.search`` takes ``candidates`` approximate hits per query from the index
  and re-ranks them by exact inner product with their vectors read from the shards.
- :func:`pool_candidates` gives the training split's neighbour search its candidates: the
  union of every query's re-ranked top candidates, as a small ``[C, D]`` pool with captions.
  A query's exact top-k in that union is its top-k in the whole pool as far as the index finds
  it (recall measured by ``scripts/bench_large_pool.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..files import atomic_folder, file_lock, remove_leftovers, write_json_atomic
from ..integrity import DamagedArtefact, RunningDigest, digests, verify_all
from .faiss_search import NeighbourError, load_faiss
from .pool_shards import PoolShards

log = logging.getLogger(__name__)

POOL_INDEX_FORMAT_VERSION = 1
# ----------------------------------------------------------------------------- the index
COARSE_QUANTIZERS = ("flat", "hnsw")


@dataclass
class PoolIndexConfig:
    """IVF-PQ over the pool. ``nlist`` lists (default ~sqrt(N), :meth:`lists`); ``m``
    sub-quantizers of ``nbits`` bits each: ``m·nbits/8`` bytes of code per vector (32). With 4
    bits the index is searched by FAISS's fast-scan kernels (IndexIVFPQFastScan, SIMD lookups
    in registers), and encoding compares each sub-vector with 16 code words instead of 256;
    the re-ranking makes up for the coarser codes. ``nprobe`` lists searched; ``candidates``
    approximate hits re-ranked exactly per query: enough to hold a query's whole cluster of
    near-duplicates, among which no 32-byte code tells the nearest (on the benchmark's pool
    of 10 M, ~100 vectors per sub-topic, recall@1 needed ~128 whatever the codes). Training: coarse k-means
    (``kmeans_iterations``) on ``train_size`` vectors (default 40 per list), the PQ code words
    (``pq_iterations``) on the residuals of up to ``pq_train_size`` of them (FAISS takes at
    most 256 per code word). The coarse
    quantizer (``coarse``) finds a vector's list while adding and a query's lists:
    ``"flat"`` compares with every centroid in one BLAS product (exact); ``"hnsw"`` walks a
    graph of ``hnsw_m`` links over the centroids (``assign_ef`` deep while adding,
    max(64, 2·nprobe) while searching), which pays only for tens of thousands of lists: at
    2,000-6,324 lists of 512-d vectors flat assignment measured 1.5-3x faster per vector
    (scripts/bench_large_pool.py). Vectors are added ``chunk_rows`` at a time."""

    nlist: int | None = None
    m: int = 64
    nbits: int = 4
    nprobe: int = 32
    candidates: int = 128
    train_size: int | None = None
    kmeans_iterations: int = 10
    pq_train_size: int = 65_536
    pq_iterations: int = 25
    coarse: str = "flat"
    hnsw_m: int = 32
    assign_ef: int = 32
    chunk_rows: int = 262_144
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "m",
            "nbits",
            "nprobe",
            "candidates",
            "kmeans_iterations",
            "pq_train_size",
            "pq_iterations",
            "hnsw_m",
            "assign_ef",
            "chunk_rows",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NeighbourError(f"pool index {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.nbits not in (4, 8):
            raise NeighbourError(f"pool index nbits must be 4 (fast-scan) or 8, got {self.nbits!r}")
        if self.coarse not in COARSE_QUANTIZERS:
            raise NeighbourError(f"pool index coarse must be one of {COARSE_QUANTIZERS}, got {self.coarse!r}")

    def lists(self, n: int) -> int:
        """The lists of a pool of ``n``: ``nlist``, else ~sqrt(n); at most n / 39 (FAISS's minimum
        of 39 training points per list). Assigning every vector to its list costs ``nlist``
        inner products each, the build's largest stage: sqrt(n) lists built a 1M pool in about
        half the time of 2·sqrt(n) with the same recall and speed after re-ranking
        (scripts/bench_large_pool.py)."""
        nlist = self.nlist if self.nlist is not None else int(n**0.5)
        return int(max(1, min(nlist, n // 39)))


# what the build's stages are called in its timings (BuildStages), in order
BUILD_STAGES = ("sample", "coarse_training", "quantizer", "pq_training", "reading", "assignment", "encoding")


class BuildStages(dict):
    """Seconds spent in each stage of a build (:data:`BUILD_STAGES`, then ``writing`` when saved)."""

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def faiss_threads(n: int):
    """FAISS's OpenMP threads set to ``n`` inside the block, restored after."""
    faiss = load_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _sample_rows(shards: PoolShards, size: int, seed: int) -> np.ndarray:
    n = len(shards)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    vectors = shards.rows(rows)
    shards.check(vectors, rows=rows)
    return vectors


def _coarse_quantizer(faiss, centroids: np.ndarray, config: PoolIndexConfig):
    if config.coarse == "flat":
        quantizer = faiss.IndexFlatIP(centroids.shape[1])
    else:
        quantizer = faiss.IndexHNSWFlat(centroids.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efConstruction = 80
        quantizer.hnsw.efSearch = config.assign_ef
    quantizer.add(centroids)
    return quantizer


def set_search_depth(index, nprobe: int) -> None:
    """``nprobe`` lists per query, and an HNSW quantizer searched deep enough to return them."""
    faiss = load_faiss()
    index.nprobe = nprobe
    quantizer = faiss.downcast_index(index.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * nprobe)


def build_pool_index(
    shards: PoolShards,
    config: PoolIndexConfig | None = None,
    progress: bool | None = None,
    stages: BuildStages | None = None,
) -> faiss.Index:  # noqa: F821
    """Train and fill an IVF-PQ inner-product index over ``shards``, chunk by chunk.

    FAISS runs the stages on all the threads it is given (``faiss.omp_set_num_threads``; all
    cores unless ``OMP_NUM_THREADS`` says otherwise), the PQ training on one. No stage holds
    more than the training sample and one chunk of float vectors; the index holds
    ``m·nbits/8`` bytes + an 8-byte id per vector.
    ``progress``: a bar over the vectors added (stderr, on a terminal); ``stages``: filled with
    the seconds of each stage (:data:`BUILD_STAGES`)."""
    from tqdm.auto import tqdm

    from ..console import show_progress

    faiss = load_faiss()
    config = config or PoolIndexConfig()
    stages = stages if stages is not None else BuildStages()
    n, d = len(shards), shards.dim
    if d % config.m:
        raise NeighbourError(f"pool index m={config.m} must divide the embedding width {d}")
    nlist = config.lists(n)
    with stages("sample"):
        sample = _sample_rows(shards, config.train_size or max(40 * nlist, 65_536), config.seed)
    with stages("coarse_training"):
        kmeans = faiss.Kmeans(d, nlist, niter=config.kmeans_iterations, seed=config.seed, spherical=True, verbose=False)
        kmeans.train(sample)
    with stages("quantizer"):
        quantizer = _coarse_quantizer(faiss, kmeans.centroids, config)
    # fewer bits for a pool too small to train 2**nbits code words per sub-quantizer
    nbits = config.nbits if n >= 1024 else min(config.nbits, max(1, int(np.log2(n)) - 2))
    index = faiss.IndexIVFPQ(quantizer, d, nlist, config.m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index frees it
    index.cp.seed = config.seed
    index.pq.cp.niter = config.pq_iterations
    index.pq.cp.seed = config.seed
    with stages("pq_training"), faiss_threads(1):
        # The quantizer is trained (ntotal == nlist): this trains the PQ codebooks on residuals.
        # On one thread: m small k-means (FAISS samples 256 points per code word) are a second
        # of work, split into thousands of tiny parallel regions, and with other processes on
        # the cores every region waits for a descheduled thread (measured 1 s on one thread,
        # 20-75 s on two, on the shared 2-core machine).
        pq_sample = sample[np.random.default_rng(config.seed + 1).permutation(len(sample))[: config.pq_train_size]]
        del sample
        index.train(pq_sample)
        del pq_sample
    bar = tqdm(
        total=n,
        unit="vec",
        unit_scale=True,
        desc="safe pool index",
        file=sys.stderr,
        disable=not show_progress(progress),
        mininterval=5,
    )
    chunks = shards.chunks(config.chunk_rows, reuse=True)
    while True:
        with stages("reading"):  # from the memory-mapped shards, checked
            start, chunk = next(chunks, (None, None))
        if chunk is None:
            break
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        with stages("assignment"):
            _, lists = quantizer.search(chunk, 1)
            lists = np.ascontiguousarray(lists[:, 0])
        with stages("encoding"):  # residuals to the list centroid, PQ codes, appended to the lists
            # swig_ptr keeps no reference: chunk, ids and lists stay alive as locals of this frame
            index.add_core(len(chunk), faiss.swig_ptr(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        bar.update(len(chunk))
    bar.close()
    if nbits == 4:
        with stages("encoding"):  # the same codes, packed in blocks of 32 for the fast-scan search
            fast = faiss.IndexIVFPQFastScan(index)
            index.own_fields = False  # the quantizer now belongs to the fast-scan index
            fast.own_fields = True
            del index
            index = fast
    set_search_depth(index, config.nprobe)
    return index


def write_index(index, path: Path) -> tuple[str, int]:
    """Write ``index`` to ``path``, hashing the bytes as they are written: ``(digest, size)``.
    The digest is :func:`saferclip.integrity.digest_file`'s, with no second read of the file."""
    faiss = load_faiss()
    digest, size = RunningDigest(), 0
    with open(path, "wb") as f:

        def write(data: bytes) -> None:
            nonlocal size
            f.write(data)
            digest.update(data)
            size += len(data)

        writer = faiss.PyCallbackIOWriter(write)
        faiss.write_index(index, writer)
        del writer  # flushes its buffer through ``write``
    return digest.value(), size


def index_bytes(index) -> int:
    """The serialised size of ``index``, counted without holding a copy of it."""
    faiss = load_faiss()
    size = 0

    def count(data: bytes) -> None:
        nonlocal size
        size += len(data)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return size


class PoolIndex:
    """An IVF-PQ index over :class:`PoolShards`, searched with exact re-ranking."""

    def __init__(self, index, shards: PoolShards, config: PoolIndexConfig):
        self.index, self.shards, self.config = index, shards, config
        set_search_depth(self.index, config.nprobe)

    def search(self, queries: np.ndarray, k: int = 1, query_chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``queries [Q, D]``: ``(ids [Q, k] int64, cosines [Q, k] float32)``, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.shards.dim:
            raise NeighbourError(f"queries must be [Q, {self.shards.dim}], got {tuple(queries.shape)}")
        c = max(k, self.config.candidates)
        ids_out = np.empty((len(queries), k), dtype=np.int64)
        sims_out = np.empty((len(queries), k), dtype=np.float32)
        for s in range(0, len(queries), query_chunk):
            q = queries[s : s + query_chunk]
            _, cand = self.index.search(q, c)
            missing = cand < 0  # a list shorter than c: pad with a real row, masked below
            vectors = self.shards.rows(np.where(missing, 0, cand))  # [q, c, D] from the re-ranking store
            exact = np.einsum("qcd,qd->qc", vectors, q)
            exact[missing] = -np.inf
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            ids_out[s : s + len(q)] = np.take_along_axis(cand, top, axis=1)
            sims_out[s : s + len(q)] = np.take_along_axis(exact, top, axis=1)
        if np.any(~np.isfinite(sims_out)):
            raise NeighbourError(f"the pool index found fewer than k={k} candidates for some queries; raise nprobe")
        return ids_out, sims_out

    def bytes_per_vector(self) -> float:
        """The index's own size per pool vector (codes + ids + lists; centroids amortised)."""
        return index_bytes(self.index) / max(len(self.shards), 1)


def load_or_build_pool_index(
    shards: PoolShards,
    folder: str | Path,
    config: PoolIndexConfig | None = None,
    progress: bool | None = None,
    stages: BuildStages | None = None,
) -> PoolIndex:
    """The pool's index saved in ``folder/<key>/`` (checksummed, atomic, one build per key).
    ``stages``: as :func:`build_pool_index`, plus ``writing`` (the file and its checksum)."""
    import hashlib

    faiss = load_faiss()
    config = config or PoolIndexConfig()
    build = {k: v for k, v in asdict(config).items() if k not in ("nprobe", "candidates", "chunk_rows")}
    identity = {"format_version": POOL_INDEX_FORMAT_VERSION, "pool": shards.identity(), "index": build}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    final = Path(folder) / key

    def load() -> PoolIndex | None:
        if not (final / "pool_index.json").is_file():
            return None
        try:
            info = json.loads((final / "pool_index.json").read_text())
            verify_all(final, info["checksums"], "safe pool index")
            index = faiss.read_index(str(final / "ivfpq.faiss"))
            if index.ntotal != len(shards) or index.d != shards.dim:
                raise DamagedArtefact(
                    final / "ivfpq.faiss", f"{index.ntotal} x {index.d}, the pool is {len(shards)} x {shards.dim}"
                )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("%s; rebuilding the safe pool index", " ".join(str(e).split()))
            return None
        return PoolIndex(index, shards, config)

    found = load()
    if found is not None:
        return found
    with file_lock(Path(folder) / f".{key}.lock"):
        found = load()
        if found is not None:
            return found
        remove_leftovers(final)
        with atomic_folder(final, replace=True) as tmp:
            t0 = time.perf_counter()
            stages = stages if stages is not None else BuildStages()
            index = build_pool_index(shards, config, progress, stages)
            with stages("writing"):
                digest, _ = write_index(index, tmp / "ivfpq.faiss")
            write_json_atomic(
                tmp / "pool_index.json",
                {
                    **identity,
                    "key": key,
                    "count": len(shards),
                    "checksums": {"ivfpq.faiss": digest},
                    "build_seconds": round(time.perf_counter() - t0, 3),
                    "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                },
            )
        log.info("safe pool index of %d vectors built in %.1fs", len(shards), time.perf_counter() - t0)
    return PoolIndex(index, shards, config)


def pool_candidates(pool: PoolIndex, queries: np.ndarray, per_query: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of every query's re-ranked top ``per_query`` pool rows: ``(rows [C] sorted,
    vectors float32 [C, D])``. Searching exactly in these C rows gives each query the same top
    ``per_query`` as the index over the whole pool."""
    ids, _ = pool.search(queries, k=per_query)
    rows = np.unique(ids.reshape(-1))
    return rows, pool.shards.rows(rows)


def is_embedded_pool(path: str | Path | None) -> bool:
    """True when ``extra_pool`` names a folder of embedding shards (else: a caption file)."""
    return path is not None and Path(path).is_dir()


def check_pool_model(
    shards: PoolShards, rows: np.ndarray, encode_captions, sample: int = 16, min_cosine: float = 0.99
) -> None:
    """The pool must have been embedded by the frozen model: re-embed ``sample`` of its captions
    with ``encode_captions(list[str]) -> [n, D]`` and compare (ConfigError naming the pool)."""
    if not shards.metadata or not len(rows):
        return
    pick = rows[np.linspace(0, len(rows) - 1, num=min(sample, len(rows))).astype(np.int64)]
    mine = np.asarray(encode_captions(shards.captions(pick)), dtype=np.float32)
    cos = np.sum(mine * shards.rows(pick), axis=1)
    if not np.all(cos >= min_cosine):
        worst = int(np.argmin(cos))
        raise ConfigError(
            f"{shards.root}: the pool's embeddings were not made by this model (row {int(pick[worst])}: "
            f"cosine {cos[worst]:.3f} between its stored vector and its caption embedded now, expected >= {min_cosine})"
        )


def attach_large_pool(cache, pool: PoolIndex, per_query: int, encode_captions=None):
    """``cache`` with its extra safe pool replaced by the large pool's candidates for its unsafe captions.

    Every unsafe caption ``T0(U)`` takes its re-ranked top ``per_query`` rows from ``pool``; their
    union (vectors and captions) becomes the cache's ``extra_safe_text`` / ``extra_safe_captions``,
    written once (checksummed, atomically) under ``cache.path / "pools" / <key>``, which is also
    the returned cache's ``path`` (so its saved neighbours live there) and ``key``.
    ``encode_captions``: when given, :func:`check_pool_model` runs first.
    """
    import dataclasses
    import hashlib

    import torch

    from .cache_format import EXTRA_FIELD

    identity = {
        "cache": cache.key,
        "pool": pool.shards.identity(),
        "index": asdict(pool.config),
        "per_query": per_query,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    final = cache.path / "pools" / key

    def load():
        info = json.loads((final / "pool.json").read_text())
        verify_all(final, info["checksums"], "safe pool candidates")
        vectors = np.load(final / f"{EXTRA_FIELD}.npy", mmap_mode="c", allow_pickle=False)
        captions = json.loads((final / "extra_safe_captions.json").read_text())
        if vectors.shape != (len(captions), cache.dim):
            raise DamagedArtefact(final / f"{EXTRA_FIELD}.npy", f"shape {vectors.shape}, {len(captions)} captions")
        return vectors, captions

    loaded = None
    if (final / "pool.json").is_file():
        try:
            loaded = load()
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s; searching the safe pool again", " ".join(str(e).split()))
    if loaded is None:
        with file_lock(final.parent / f".{key}.lock"):
            remove_leftovers(final)
            t0 = time.perf_counter()
            queries = cache.unsafe_text.float().numpy()
            rows, vectors = pool_candidates(pool, queries, per_query)
            if encode_captions is not None:
                check_pool_model(pool.shards, rows, encode_captions)
            captions = pool.shards.captions(rows)
            with atomic_folder(final, replace=True) as tmp:
                np.save(tmp / f"{EXTRA_FIELD}.npy", vectors.astype(np.float32))
                np.save(tmp / "pool_rows.npy", rows)
                (tmp / "extra_safe_captions.json").write_text(json.dumps(captions, ensure_ascii=False) + "\n")
                names = [f"{EXTRA_FIELD}.npy", "pool_rows.npy", "extra_safe_captions.json"]
                info = {
                    **identity,
                    "key": key,
                    "count": len(rows),
                    "checksums": digests(tmp, names),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                write_json_atomic(tmp / "pool.json", info)
            log.info(
                "safe pool: %d candidate captions for %d unsafe captions in %.1fs",
                len(rows),
                len(queries),
                time.perf_counter() - t0,
            )
        loaded = load()
    vectors, captions = loaded
    return dataclasses.replace(
        cache,
        key=f"{cache.key}-{key[:8]}",
        path=final,
        extra_safe_text=torch.from_numpy(vectors),
        extra_safe_captions=captions,
        meta={**cache.meta, "large_pool": {"key": key, "pool": str(pool.shards.root), "pool_size": len(pool.shards)}},
    )

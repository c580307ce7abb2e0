"""Benchmark the large safe pool (saferclip.redirection.large_pool): IVF-PQ with exact re-ranking
over embedding shards on disk, at a chosen size (10 M x 512 is the target).

It writes a synthetic pool in clip-retrieval's layout (``text_emb/text_emb_<i>.npy`` float16
shards) under ``--workdir`` (a temporary folder under /tmp by default, removed at the end
unless ``--keep``), then measures:

- build time of the index (k-means on a sample, PQ training, chunked adding from the memory maps);
- index bytes per vector (the serialised index / N) and the re-ranking store on disk (the shards);
- recall@1 against exact search on ``--queries`` queries (exact search scans every shard in
  chunks, with FAISS's flat inner-product search), and queries per second of the re-ranked search;
- peak resident memory of the process (``ru_maxrss``), after each phase (the shards are
  generated in a child process, so it is the index's and the search's).

The vectors are the clustered two-level Gaussian mixture on the unit sphere of
``saferclip/benchmarks/vectors.py`` (topics, sub-topics, items around them), queries drawn from the
same mixture: no real embedding looks like uniform noise. Figures on real CLIP embeddings
will differ.

    python scripts/bench_large_pool.py --size 1000000               # ~10 min on one thread
    nohup python scripts/bench_large_pool.py --size 10000000 > bench_10m.log 2>&1 &
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from saferclip.app.cli import prefer_fast_openblas

prefer_fast_openblas()
import faiss  # noqa: E402, I001

from saferclip.benchmarks.vectors import mixture  # noqa: E402 - after the BLAS choice, as faiss
from saferclip.redirection.large_pool import PoolIndex, PoolIndexConfig, build_pool_index, open_pool  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def write_shards(folder: Path, n: int, args) -> None:
    (folder / "text_emb").mkdir(parents=True)
    for i, start in enumerate(range(0, n, args.shard_rows)):
        rows = min(args.shard_rows, n - start)
        out = np.lib.format.open_memmap(folder / "text_emb" / f"text_emb_{i}.npy", mode="w+", dtype=np.float16, shape=(rows, args.dim))
        for s in range(0, rows, 250_000):
            m = min(250_000, rows - s)
            out[s : s + m] = mixture(m, args.dim, args.topics, args.subtopics, seed=args.seed * 100_003 + start + s)
        out.flush()
        del out
    np.save(folder / "queries.npy", mixture(args.queries, args.dim, args.topics, args.subtopics, seed=10**9 + args.seed))


def exact_top1(shards, queries: np.ndarray, chunk: int) -> np.ndarray:
    best_sim = np.full(len(queries), -np.inf, dtype=np.float32)
    best_id = np.full(len(queries), -1, dtype=np.int64)
    for start, block in shards.chunks(chunk):
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        sims, ids = index.search(queries, 1)
        better = sims[:, 0] > best_sim
        best_sim[better], best_id[better] = sims[better, 0], ids[better, 0] + start
    return best_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--shard-rows", type=int, default=1_000_000)
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--subtopics", type=int, default=100, help="sub-topics per topic")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--m", type=int, default=32, help="PQ bytes per vector")
    p.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    p.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the shards go (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the shards")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="saferclip_pool_", dir="/tmp"))
    print(
        f"faiss {faiss.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; pool {args.size:,} x {args.dim} "
        f"float16 shards of {args.shard_rows:,} in {work}; mixture {args.topics} topics x {args.subtopics} sub-topics",
        flush=True,
    )
    try:
        t0 = time.perf_counter()
        if not (work / "text_emb").is_dir():
            # in a child process: the peak memory printed below is then the index's, not the generator's
            child = multiprocessing.get_context("fork").Process(target=write_shards, args=(work, args.size, args))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"writing the shards failed (exit code {child.exitcode})")
        print(f"shards written: {time.perf_counter() - t0:.0f}s", flush=True)
        shards = open_pool(work)
        queries = np.load(work / "queries.npy")  # drawn from the same mixture, beside the shards
        config = PoolIndexConfig(nlist=args.nlist, m=args.m, nprobe=args.nprobe[0], candidates=args.candidates[0])
        t0 = time.perf_counter()
        index = build_pool_index(shards, config)
        build = time.perf_counter() - t0
        store = sum(f.stat().st_size for f in shards.files)
        pool = PoolIndex(index, shards, config)
        print(
            f"build: {build:.0f}s (nlist {config.lists(len(shards))}, PQ m={args.m}); index {pool.bytes_per_vector():.1f} "
            f"bytes/vector; re-ranking store on disk {store / len(shards):.0f} bytes/vector ({store / 2**30:.1f} GiB); "
            f"peak RSS {peak_gb():.2f} GB",
            flush=True,
        )
        t0 = time.perf_counter()
        truth = exact_top1(shards, queries, chunk=args.shard_rows)
        print(f"exact search of {len(queries):,} queries: {time.perf_counter() - t0:.0f}s; peak RSS {peak_gb():.2f} GB", flush=True)
        print("nprobe  candidates  recall@1  queries/s  peak RSS GB")
        for nprobe in args.nprobe:
            for cand in args.candidates:
                pool = PoolIndex(index, shards, PoolIndexConfig(nlist=args.nlist, m=args.m, nprobe=nprobe, candidates=cand))
                t0 = time.perf_counter()
                ids, _ = pool.search(queries, k=1)
                seconds = time.perf_counter() - t0
                recall = float(np.mean(ids[:, 0] == truth))
                print(f"{nprobe:6d}  {cand:10d}  {recall:8.4f}  {len(queries) / seconds:9.0f}  {peak_gb():11.2f}", flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

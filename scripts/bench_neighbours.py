"""Benchmark the safe-neighbour search (saferclip.redirection.faiss_search).

(a) FAISS exact (IndexFlatIP) against the plain torch reference (matmul + topk) on the same
    data and the same number of threads: agreement of the top-k and the time ratio.
(b) exact against approximate (IVF, HNSW) on pools of 10k / 100k / 1M vectors: search time,
    build time (reported apart), and recall@1 against exact, for a few nprobe / efSearch values.

The vectors are synthetic but *clustered*: a two-level Gaussian mixture on the unit sphere
(topics, sub-topics within them, items around those), queries drawn from the same mixture.
Uniform random vectors in 768-d are nearly orthogonal to each other with no neighbour
structure at all, which no real embedding looks like, and approximate indexes score
meaninglessly on them. Figures on real CLIP embeddings will differ; the ranking of the
options and the order of magnitude are what this shows.

    python scripts/bench_neighbours.py                       # 10k, 100k, 1M (~3 GB of RAM at 1M)
    python scripts/bench_neighbours.py --sizes 10000,100000  # quicker
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np
import torch

# faiss's OpenBLAS kernels are chosen when it loads: as the commands do, before importing it
from saferclip.app.cli import prefer_fast_openblas

prefer_fast_openblas()
import faiss  # noqa: E402, I001

from saferclip.benchmarks.vectors import mixture  # noqa: E402
from saferclip.redirection.faiss_search import (  # noqa: E402, I001
    SearchSettings,
    build_neighbour_index,
    default_nlist,
    exact_neighbours_torch,
    make_index,
)


def row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cols, widths))


def compare_torch(pool: np.ndarray, queries: np.ndarray, k: int, repeats: int) -> None:
    print(
        f"\n(a) FAISS exact vs torch matmul+topk: pool {len(pool):,}, {len(queries):,} queries, d={pool.shape[1]}, k={k}"
    )
    faiss_s, torch_s = [], []
    for _ in range(repeats):  # interleaved, best of: the machine is shared
        f = build_neighbour_index(queries, pool, k=k, index="exact", device="cpu")
        faiss_s.append(f.search_seconds)
        t = exact_neighbours_torch(torch.from_numpy(queries), torch.from_numpy(pool), k=k)
        torch_s.append(t.search_seconds)
    same_top1 = (f.indices[:, 0] == t.indices[:, 0]).float().mean().item()
    same_set = np.mean([len(set(a) & set(b)) / k for a, b in zip(f.indices.tolist(), t.indices.tolist())])
    max_diff = (f.similarities - t.similarities).abs().max().item()
    print(
        f"    top-1 agreement {100 * same_top1:.2f}%   top-{k} set agreement {100 * same_set:.2f}%   max |sim diff| {max_diff:.2e}"
    )
    print(
        f"    faiss {min(faiss_s):.2f}s   torch {min(torch_s):.2f}s   torch/faiss time ratio {min(torch_s) / min(faiss_s):.2f} (>1: faiss faster)"
    )


def bench_size(n: int, args, queries: np.ndarray) -> None:
    pool = mixture(n, args.dim, args.topics, args.subtopics, seed=args.seed)
    widths = [9, 6, 16, 9, 9, 9, 9]
    print(f"\n(b) pool {n:,} x {args.dim}, {len(queries):,} queries, k=1")
    print(row(["pool", "index", "params", "build s", "search s", "speedup", "recall@1"], widths))
    exact = build_neighbour_index(queries, pool, k=1, index="exact", device="cpu")
    gc.collect()
    print(row([f"{n:,}", "exact", "-", "-", f"{exact.search_seconds:.2f}", "1.0x", "1.0000"], widths), flush=True)

    def report(kind: str, params: str, build: float, res) -> None:
        recall = (res.indices[:, 0] == exact.indices[:, 0]).float().mean().item()
        speed = exact.search_seconds / res.search_seconds
        print(
            row(
                [f"{n:,}", kind, params, f"{build:.1f}", f"{res.search_seconds:.2f}", f"{speed:.1f}x", f"{recall:.4f}"],
                widths,
            ),
            flush=True,
        )

    if "ivf" in args.approx:
        nlist = args.nlist or default_nlist(n)
        t0 = time.perf_counter()
        idx = make_index(pool, SearchSettings(index="ivf", device="cpu", nlist=nlist))  # built once, searched at several nprobe
        index_build = time.perf_counter() - t0
        for nprobe in args.nprobe:
            idx.nprobe = min(nprobe, nlist)
            t0 = time.perf_counter()
            sims, ids = idx.search(queries, 1)
            report("ivf", f"nlist={nlist} np={nprobe}", index_build, _Result(ids, time.perf_counter() - t0))
        del idx
        gc.collect()
    if "hnsw" in args.approx and n <= args.hnsw_max_size:
        t0 = time.perf_counter()
        idx = make_index(pool, SearchSettings(index="hnsw", device="cpu", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction))
        build = time.perf_counter() - t0
        for ef in args.ef_search:
            idx.hnsw.efSearch = ef
            t0 = time.perf_counter()
            sims, ids = idx.search(queries, 1)
            report("hnsw", f"M={args.hnsw_m} ef={ef}", build, _Result(ids, time.perf_counter() - t0))
        del idx
    elif "hnsw" in args.approx:
        print(
            row([f"{n:,}", "hnsw", "skipped", "", "", "", ""], widths)
            + f"   (pool > --hnsw-max-size {args.hnsw_max_size:,}: slow to build)"
        )
    del pool
    gc.collect()


class _Result:
    def __init__(self, ids: np.ndarray, seconds: float):
        self.indices = torch.from_numpy(ids.astype(np.int64))
        self.search_seconds = seconds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[10_000, 100_000, 1_000_000], help="pool sizes, comma-separated")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--topics", type=int, default=200)
    p.add_argument("--subtopics", type=int, default=50, help="sub-topics per topic")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="for both FAISS (OpenMP) and torch")
    p.add_argument("--approx", default="ivf,hnsw")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(pool))")
    p.add_argument("--nprobe", type=ints, default=[4, 8, 16, 32])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=ints, default=[32, 64, 128])
    p.add_argument("--hnsw-max-size", type=int, default=100_000, help="skip HNSW above this pool size (build time)")
    p.add_argument("--compare-size", type=int, default=100_000, help="pool size of part (a); 0 skips it")
    p.add_argument("--compare-k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.approx = [a for a in args.approx.split(",") if a]

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(
        f"faiss {faiss.__version__} (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'auto')}), "
        f"torch {torch.__version__}, {args.threads} threads for both, "
        f"{os.cpu_count()} CPUs; two-level Gaussian mixture: {args.topics} topics x {args.subtopics} sub-topics"
    )
    queries = mixture(args.queries, args.dim, args.topics, args.subtopics, seed=args.seed + 1)
    if args.compare_size:
        compare_torch(
            mixture(args.compare_size, args.dim, args.topics, args.subtopics, seed=args.seed),
            queries,
            args.compare_k,
            args.repeats,
        )
    for n in args.sizes:
        bench_size(n, args, queries)


if __name__ == "__main__":
    main()

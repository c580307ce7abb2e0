"""Benchmark the large safe pool (saferclip.redirection.large_pool): IVF-PQ with exact re-ranking
over embedding shards on disk, at growing sizes (1 M, 2 M, 5 M, 10 M x 512 by default).

It writes a synthetic pool in clip-retrieval's layout (``text_emb/text_emb_<i>.npy`` float16
shards of ``--shard-rows``) under ``--workdir`` (a new folder under /tmp by default, removed at
the end unless ``--keep``), once, at the largest size: the block of rows starting at row ``r``
is drawn with the seed ``r``, so the pool of every smaller size is the first shards of it (a
folder of links). Then, for each size, in a fresh child process (so that its peak memory is
that size's own), with the pool's pages dropped from the page cache first (a pool embedded
yesterday is read from disk):

- the build, as ``saferclip-train`` runs it (``load_or_build_pool_index``): the seconds of each
  stage (sample, coarse k-means, PQ training, reading the shards, assignment to lists,
  encoding, writing the index with its checksum) and in all;
- the index's bytes per vector (its file / N) and the re-ranking store's (the shards);
- exact top-10 of ``--queries`` held-out queries (drawn from the same mixture with another
  seed, not in the pool) by a scan of every shard with FAISS's flat search, and the exact
  scan's queries per second;
- for each ``--nprobe`` x ``--candidates``: recall@1 and recall@10 of the re-ranked search
  against exact, and its queries per second (after a warm-up);
- the child's peak resident memory (``ru_maxrss``) after the build and after the searches.

Generation runs in ``--threads`` worker processes beforehand and is timed apart. The result
file (``--json``, written atomically after every size) holds the configuration (threads,
versions, CPU, load average before and after each size) and every figure;
``scripts/update_doc_tables.py --from pool=<it>`` turns it into docs/GPU.md's tables and plot
(:mod:`saferclip.redirection.scale_summary`).

The vectors are the clustered two-level Gaussian mixture on the unit sphere of
``saferclip/benchmarks/vectors.py`` (topics, sub-topics, items around them), queries drawn from the
same mixture: no real embedding looks like uniform noise. Figures on real CLIP embeddings
will differ.

    python scripts/bench_large_pool.py --sizes 1000000 --json /tmp/pool_1m.json
    python scripts/bench_large_pool.py --sizes 1000000,2000000,5000000,10000000 --json outputs/scale/large_pool_growth.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from saferclip.app.cli import prefer_fast_openblas

prefer_fast_openblas()
import faiss  # noqa: E402, I001

from saferclip.benchmarks.vectors import mixture  # noqa: E402 - after the BLAS choice, as faiss
from saferclip.files import write_json_atomic  # noqa: E402
from saferclip.redirection.large_pool import (  # noqa: E402
    BuildStages,
    PoolIndex,
    PoolIndexConfig,
    index_bytes,
    load_or_build_pool_index,
)
from saferclip.redirection.pool_shards import open_pool  # noqa: E402

BLOCK = 250_000  # rows drawn per generator call (and per seed)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------- the synthetic pool
def _write_block(job: tuple) -> None:
    path, local, rows, first_row, args = job
    out = np.load(path, mmap_mode="r+")
    out[local : local + rows] = mixture(
        rows, args["dim"], args["topics"], args["subtopics"], seed=args["seed"] * 100_003 + first_row
    )
    out.flush()


def write_pool(folder: Path, n: int, args) -> float:
    """``n`` rows in shards of ``args.shard_rows`` under ``folder/text_emb``, by ``args.threads``
    processes; returns the seconds taken."""
    t0 = time.perf_counter()
    (folder / "text_emb").mkdir(parents=True)
    jobs = []
    for i, start in enumerate(range(0, n, args.shard_rows)):
        rows = min(args.shard_rows, n - start)
        path = folder / "text_emb" / f"text_emb_{i}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, args.dim)).flush()
        for local in range(0, rows, BLOCK):
            spec = {k: getattr(args, k) for k in ("dim", "topics", "subtopics", "seed")}
            jobs.append((path, local, min(BLOCK, rows - local), start + local, spec))
    # fork: no OpenMP region has run in this process yet, and the children use numpy only
    with multiprocessing.get_context("fork").Pool(args.threads) as workers:
        for _ in workers.imap_unordered(_write_block, jobs):
            pass
    os.sync()  # written back: the page-cache drop before each size then leaves nothing behind
    return time.perf_counter() - t0


def prefix_pool(full: Path, folder: Path, n: int, shard_rows: int) -> Path:
    """A pool folder holding links to the first ``n / shard_rows`` shards of ``full``."""
    (folder / "text_emb").mkdir(parents=True, exist_ok=True)
    for i in range(n // shard_rows):
        link = folder / "text_emb" / f"text_emb_{i}.npy"
        if not link.exists():
            link.symlink_to(full / "text_emb" / f"text_emb_{i}.npy")
    return folder


def drop_page_cache(folder: Path) -> None:
    """Evict the pool's pages from the page cache (clean pages only: written back before)."""
    for path in (folder / "text_emb").glob("*.npy"):
        fd = os.open(path.resolve(), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- one size, in a child
def exact_top(shards, queries: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Exact top-``k`` rows ``[Q, k]`` of every query, by a flat scan of every chunk."""
    best_sim = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_id = np.full((len(queries), k), -1, dtype=np.int64)
    for start, block in shards.chunks(chunk, reuse=True):
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        sims, ids = index.search(queries, min(k, len(block)))
        sims = np.concatenate([best_sim, sims], axis=1)
        ids = np.concatenate([best_id, ids + start], axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best_sim, best_id = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return best_id


def measure(folder: str, queries_path: str, args: dict, out: str) -> None:
    """Build, exact scan and searches of one pool; the figures go to ``out`` (JSON)."""
    try:
        faiss.omp_set_num_threads(args["threads"])
        shards = open_pool(folder)
        n = len(shards)
        queries = np.load(queries_path)
        config = PoolIndexConfig(
            nlist=args["nlist"],
            m=args["m"],
            nbits=args["nbits"],
            nprobe=args["nprobe"][0],
            candidates=args["candidates"][0],
            coarse=args["coarse"],
        )
        stages = BuildStages()
        t0 = time.perf_counter()
        pool = load_or_build_pool_index(shards, Path(folder) / "index", config, stages=stages)
        build = time.perf_counter() - t0
        result = {
            "size": n,
            "nlist": config.lists(n),
            "build_seconds": build,
            "stage_seconds": dict(stages),
            "index_bytes_per_vector": index_bytes(pool.index) / n,
            "store_bytes_per_vector": sum(f.stat().st_size for f in shards.files) / n,
            "peak_gb_after_build": peak_gb(),
        }
        print(
            f"  build {build:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()) + f"); index "
            f"{result['index_bytes_per_vector']:.1f} bytes/vector; peak {result['peak_gb_after_build']:.2f} GB",
            flush=True,
        )
        t0 = time.perf_counter()
        truth = exact_top(shards, queries, 10, args["exact_chunk"])
        exact = time.perf_counter() - t0
        result.update(exact_seconds=exact, exact_queries_per_second=len(queries) / exact)
        print(
            f"  exact scan of {len(queries):,} queries: {exact:.0f}s ({len(queries) / exact:.1f} queries/s)", flush=True
        )
        result["searches"] = []
        for nprobe in args["nprobe"]:
            for cand in args["candidates"]:
                searcher = PoolIndex(
                    pool.index, shards, PoolIndexConfig(**{**vars(config), "nprobe": nprobe, "candidates": cand})
                )
                searcher.search(queries[: min(256, len(queries))], k=10)  # warm-up
                t0 = time.perf_counter()
                ids, _ = searcher.search(queries, k=10)
                seconds = time.perf_counter() - t0
                recall1 = float(np.mean(ids[:, 0] == truth[:, 0]))
                recall10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())]))
                result["searches"].append(
                    {
                        "nprobe": nprobe,
                        "candidates": cand,
                        "recall_at_1": recall1,
                        "recall_at_10": recall10,
                        "queries_per_second": len(queries) / seconds,
                    }
                )
                print(
                    f"  nprobe {nprobe:4d}  candidates {cand:4d}  recall@1 {recall1:.4f}  recall@10 {recall10:.4f}  "
                    f"{len(queries) / seconds:7.0f} queries/s",
                    flush=True,
                )
        result["peak_gb_after_search"] = peak_gb()
        write_json_atomic(out, result)
    except BaseException:
        traceback.print_exc()
        raise


def configuration(args) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "faiss": faiss.__version__,
        "faiss_build": faiss.get_compile_options(),
        "numpy": np.__version__,
        "threads": args.threads,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "auto"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[1_000_000, 2_000_000, 5_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=2000, help="held-out queries (exact top-10 by a full scan)")
    p.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per shard; every size a multiple of it")
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--subtopics", type=int, default=100, help="sub-topics per topic")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the library's, ~2 sqrt(N))")
    p.add_argument("--m", type=int, default=PoolIndexConfig.m, help="PQ sub-quantizers")
    p.add_argument("--nbits", type=int, default=PoolIndexConfig.nbits, help="bits per sub-quantizer (4: fast-scan)")
    p.add_argument("--coarse", default=PoolIndexConfig.coarse, help="coarse quantizer: flat or hnsw")
    p.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64])
    p.add_argument("--candidates", type=ints, default=[64, 128, 256])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS threads and generator processes")
    p.add_argument("--exact-chunk", type=int, default=262_144, help="rows per block of the exact scan")
    p.add_argument(
        "--json", default=None, help="write the configuration and the figures here (atomically, after each size)"
    )
    p.add_argument("--workdir", default=None, help="where the shards go (default: a new folder under /tmp)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the shards, queries and indexes (a later run with the same --workdir reuses them)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    bad = [n for n in args.sizes if n % args.shard_rows]
    if bad:
        p.error(f"sizes {bad} are not multiples of --shard-rows {args.shard_rows}")
    sizes = sorted(args.sizes)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="saferclip_pool_", dir="/tmp"))
    full = work / f"pool_{sizes[-1]}"
    report = {
        "configuration": configuration(args),
        "arguments": {k: v for k, v in vars(args).items() if k != "json"},
        "sizes": [],
    }
    print(
        f"faiss {faiss.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; pools {', '.join(f'{n:,}' for n in sizes)} "
        f"x {args.dim} float16 in shards of {args.shard_rows:,} under {work}; {args.topics} topics x {args.subtopics} sub-topics",
        flush=True,
    )
    try:
        if not (full / "text_emb").is_dir():
            seconds = write_pool(full, sizes[-1], args)
            report["generation"] = {"rows": sizes[-1], "seconds": seconds, "processes": args.threads}
            print(f"generated {sizes[-1]:,} rows in {seconds:.0f}s", flush=True)
        queries_path = work / f"queries_{args.queries}_{args.seed}.npy"
        if not queries_path.exists():
            np.save(queries_path, mixture(args.queries, args.dim, args.topics, args.subtopics, seed=10**9 + args.seed))
        for n in sizes:
            folder = full if n == sizes[-1] else prefix_pool(full, work / f"pool_{n}", n, args.shard_rows)
            shutil.rmtree(folder / "index", ignore_errors=True)
            drop_page_cache(folder)
            print(f"pool {n:,}: load average {os.getloadavg()[0]:.1f}", flush=True)
            load_before = os.getloadavg()[0]
            part = work / f"result_{n}.json"
            child = multiprocessing.get_context("spawn").Process(
                target=measure,
                args=(
                    str(folder),
                    str(queries_path),
                    {**vars(args), "nprobe": args.nprobe, "candidates": args.candidates},
                    str(part),
                ),
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"measuring the pool of {n:,} failed (exit code {child.exitcode})")
            result = json.loads(part.read_text())
            result.update(load_average_before=load_before, load_average_after=os.getloadavg()[0])
            report["sizes"].append(result)
            if args.json:
                write_json_atomic(args.json, report)
            if not args.keep:
                shutil.rmtree(folder / "index", ignore_errors=True)
    finally:
        if not args.keep and args.workdir:  # only what this run wrote in a folder it was given
            for path in [
                full,
                work / f"queries_{args.queries}_{args.seed}.npy",
                *(work / f"pool_{n}" for n in sizes),
                *(work / f"result_{n}.json" for n in sizes),
            ]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()

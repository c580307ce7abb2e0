"""Benchmark the safe-neighbour search (saferclip.redirection.faiss_search).

(a) FAISS exact (IndexFlatIP) against the plain torch reference (matmul + topk) on the same
    data and the same number of threads: agreement of the top-k and the time ratio.
(b) exact against approximate (IVF, HNSW) on pools of 10k / 100k / 1M vectors: search time,
    build time (reported apart), and recall@1 against exact, for a few nprobe / efSearch values.
    Each size is measured ``--repeats`` times (3 by default), interleaved (exact, then every
    approximate setting, then again), after one untimed warm-up search of each; every time and
    every speed-up is reported as min / median / max over the repetitions. The speed-up is
    against FAISS's exact search (``IndexFlatIP``, what ``index: exact`` runs), and against
    torch's matmul + topk, the other exact kernel, so that neither baseline flatters it.

The configuration it ran with is printed first and written into ``--json``: threads of FAISS
(OpenMP) and torch, FAISS's version and SIMD build, the BLAS libraries of numpy and torch,
``OPENBLAS_CORETYPE`` / ``OMP_NUM_THREADS``, the CPU and the load average before and after
(other processes on the same cores slow a multi-threaded BLAS kernel far more than the
per-query parallel IVF scan, which is why the speed-up must be read with the load beside it).

The vectors are synthetic but *clustered*: a two-level Gaussian mixture on the unit sphere
(topics, sub-topics within them, items around those), queries drawn from the same mixture.
Uniform random vectors in 768-d are nearly orthogonal to each other with no neighbour
structure at all, which no real embedding looks like, and approximate indexes score
meaninglessly on them. Figures on real CLIP embeddings will differ; the ranking of the
options and the order of magnitude are what this shows.

    python scripts/bench_neighbours.py                       # 10k, 100k, 1M (~3 GB of RAM at 1M)
    python scripts/bench_neighbours.py --sizes 10000,100000  # quicker
    python scripts/bench_neighbours.py --sizes 100000 --compare-size 0 --approx ivf --json outputs/scale/ivf_100k.json
    python scripts/update_doc_tables.py --from ivf=outputs/scale/ivf_100k.json  # into docs/results and docs/GPU.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone

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


def spread(values: list[float]) -> dict:
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": list(values)}


def fmt(s: dict, spec: str = ".3f", suffix: str = "") -> str:
    return f"{s['min']:{spec}}/{s['median']:{spec}}/{s['max']:{spec}}{suffix}"


def configuration(threads: list[int]) -> dict:
    """What decides the timings: threads, libraries and their BLAS, the CPU, the load."""

    def blas_of_numpy() -> str:
        try:
            info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            return f"{info.get('name')} {info.get('version')}"
        except Exception:  # numpy < 1.26 has no dicts mode
            return "unknown"

    def blas_of_torch() -> str:
        found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        return found.group(1) if found else "unknown"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "faiss": faiss.__version__,
        "faiss_build": faiss.get_compile_options(),
        "torch": torch.__version__,
        "torch_blas": blas_of_torch(),
        "numpy_blas": blas_of_numpy(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "auto"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
    }


def compare_torch(pool: np.ndarray, queries: np.ndarray, k: int, repeats: int) -> dict:
    print(
        f"\n(a) FAISS exact vs torch matmul+topk: pool {len(pool):,}, {len(queries):,} queries, d={pool.shape[1]}, k={k}"
    )
    faiss_s, torch_s = [], []
    for _ in range(repeats):  # interleaved: the machine is shared
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
    ratio = spread([b / a for a, b in zip(faiss_s, torch_s)])
    print(
        f"    faiss {fmt(spread(faiss_s), '.2f')}s   torch {fmt(spread(torch_s), '.2f')}s (min/median/max)   "
        f"torch/faiss time ratio {fmt(ratio, '.2f')} (>1: faiss faster)"
    )
    return {
        "pool": len(pool),
        "queries": len(queries),
        "k": k,
        "faiss_seconds": spread(faiss_s),
        "torch_seconds": spread(torch_s),
        "torch_over_faiss": ratio,
        "top1_agreement": same_top1,
    }


def bench_size(n: int, args, queries: np.ndarray) -> dict:
    """Exact (FAISS and torch) and approximate search of ``queries`` in a pool of ``n``,
    ``args.repeats`` interleaved repetitions after a warm-up (whose times are kept apart)."""
    pool = mixture(n, args.dim, args.topics, args.subtopics, seed=args.seed)
    print(
        f"\n(b) pool {n:,} x {args.dim}, {len(queries):,} queries, k=1, {faiss.omp_get_max_threads()} thread(s), "
        f"{args.repeats} repetitions (min/median/max)"
    )
    # the approximate indexes, each built once (build time reported apart) and searched at each setting
    indexes: list[tuple[str, str, float, object, tuple]] = []  # (kind, params, build s, index, setting)
    if "ivf" in args.approx:
        for nlist in args.nlist or [default_nlist(n)]:
            t0 = time.perf_counter()
            ivf = make_index(pool, SearchSettings(index="ivf", device="cpu", nlist=nlist))
            build = time.perf_counter() - t0
            for nprobe in args.nprobe:
                if nprobe <= nlist:
                    indexes.append(("ivf", f"nlist={nlist} nprobe={nprobe}", build, ivf, ("nprobe", nprobe, nlist)))
    if "hnsw" in args.approx and n <= args.hnsw_max_size:
        t0 = time.perf_counter()
        hnsw = make_index(
            pool, SearchSettings(index="hnsw", device="cpu", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        )
        build = time.perf_counter() - t0
        for ef in args.ef_search:
            indexes.append(("hnsw", f"M={args.hnsw_m} efSearch={ef}", build, hnsw, ("efSearch", ef, None)))
    elif "hnsw" in args.approx:
        print(f"    hnsw skipped: pool > --hnsw-max-size {args.hnsw_max_size:,} (slow to build)")

    def run(index, setting) -> tuple[float, np.ndarray]:
        name, value, _ = setting
        if name == "nprobe":
            index.nprobe = value
        else:
            index.hnsw.efSearch = value
        t0 = time.perf_counter()
        _, ids = index.search(queries, 1)
        return time.perf_counter() - t0, ids[:, 0]

    exact_index = faiss.IndexFlatIP(args.dim)
    exact_index.add(pool)

    def exact_faiss() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        _, ids = exact_index.search(queries, 1)
        return time.perf_counter() - t0, ids[:, 0]

    q_torch, p_torch = torch.from_numpy(queries), torch.from_numpy(pool)
    # warm-up: every kernel once on every query, timed but kept apart (thread pools started,
    # pages touched, caches filled): a single cold run is what made one-shot figures wander
    first_exact, truth = exact_faiss()
    first = {"exact_faiss": first_exact, "exact_torch": exact_neighbours_torch(q_torch, p_torch, k=1).search_seconds}
    first_approx = [run(index, setting)[0] for _, _, _, index, setting in indexes]
    exact_s, torch_s, approx_s = [], [], [[] for _ in indexes]
    for _ in range(args.repeats):
        exact_s.append(exact_faiss()[0])
        torch_s.append(exact_neighbours_torch(q_torch, p_torch, k=1).search_seconds)
        for j, (_, _, _, index, setting) in enumerate(indexes):
            approx_s[j].append(run(index, setting)[0])
    results = {
        "pool": n,
        "dim": args.dim,
        "queries": len(queries),
        "threads": faiss.omp_get_max_threads(),
        "repeats": args.repeats,
        "exact_faiss_seconds": spread(exact_s),
        "exact_torch_seconds": spread(torch_s),
        "first_call_seconds": first,
        "approximate": [],
    }
    widths = [5, 24, 7, 20, 18, 18, 8, 7]
    print(
        row(["index", "params", "build s", "search s", "speed-up vs faiss", "vs torch", "recall@1", "first s"], widths)
    )
    torch_vs_faiss = spread([a / b for a, b in zip(exact_s, torch_s)])
    print(
        row(
            [
                "exact",
                "faiss IndexFlatIP",
                "-",
                fmt(spread(exact_s)),
                "1.0",
                fmt(torch_vs_faiss, ".2f"),
                "1.0000",
                f"{first['exact_faiss']:.2f}",
            ],
            widths,
        )
    )
    print(
        row(
            [
                "exact",
                "torch matmul+topk",
                "-",
                fmt(spread(torch_s)),
                fmt(torch_vs_faiss, ".2f"),
                "1.0",
                "1.0000",
                f"{first['exact_torch']:.2f}",
            ],
            widths,
        )
    )
    for j, (kind, params, build, index, setting) in enumerate(indexes):
        _, found = run(index, setting)  # the ids (deterministic: the same every repetition)
        recall = float(np.mean(found == truth))
        vs_faiss = spread([e / a for e, a in zip(exact_s, approx_s[j])])
        vs_torch = spread([t / a for t, a in zip(torch_s, approx_s[j])])
        print(
            row(
                [
                    kind,
                    params,
                    f"{build:.1f}",
                    fmt(spread(approx_s[j])),
                    fmt(vs_faiss, ".1f", "x"),
                    fmt(vs_torch, ".1f", "x"),
                    f"{recall:.4f}",
                    f"{first_approx[j]:.2f}",
                ],
                widths,
            ),
            flush=True,
        )
        entry = {
            "index": kind,
            "params": params,
            setting[0]: setting[1],
            "build_seconds": build,
            "search_seconds": spread(approx_s[j]),
            "first_call_seconds": first_approx[j],
            "speedup_vs_faiss_exact": vs_faiss,
            "speedup_vs_torch_exact": vs_torch,
            "recall_at_1": recall,
        }
        if setting[2] is not None:
            entry["nlist"] = setting[2]
        results["approximate"].append(entry)
    reaching = [r for r in results["approximate"] if r["index"] == "ivf" and r["recall_at_1"] >= args.target_recall]
    if reaching:
        best = max(reaching, key=lambda r: r["speedup_vs_faiss_exact"]["median"])  # the fastest setting that reaches it
        results["ivf_at_target_recall"] = best
        print(
            f"    fastest IVF at recall@1 >= {args.target_recall}: {best['params']}, recall {best['recall_at_1']:.4f}, speed-up "
            f"{fmt(best['speedup_vs_faiss_exact'], '.1f', 'x')} vs faiss exact, {fmt(best['speedup_vs_torch_exact'], '.1f', 'x')} "
            f"vs torch (min/median/max)"
        )
    exact_index.reset()  # its copy of the pool freed before the next size
    del pool, indexes
    gc.collect()
    return results


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
    p.add_argument(
        "--threads",
        type=ints,
        default=[os.cpu_count()],
        help="for both FAISS (OpenMP) and torch; several: each in turn",
    )
    p.add_argument("--approx", default="ivf,hnsw")
    p.add_argument("--nlist", type=ints, default=None, help="IVF lists, comma-separated (default ~sqrt(pool))")
    p.add_argument("--nprobe", type=ints, default=[4, 8, 16, 32])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=ints, default=[32, 64, 128])
    p.add_argument("--hnsw-max-size", type=int, default=100_000, help="skip HNSW above this pool size (build time)")
    p.add_argument("--compare-size", type=int, default=100_000, help="pool size of part (a); 0 skips it")
    p.add_argument("--compare-k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-recall", type=float, default=0.99, help="report the fastest IVF setting that reaches it")
    p.add_argument("--json", default=None, help="write the configuration and every figure here (atomically)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.approx = [a for a in args.approx.split(",") if a]

    config = configuration(args.threads)
    print("configuration: " + ", ".join(f"{k} {v}" for k, v in config.items()))
    print(f"two-level Gaussian mixture: {args.topics} topics x {args.subtopics} sub-topics, d={args.dim}")
    out = {"configuration": config, "arguments": {k: v for k, v in vars(args).items() if k != "json"}, "runs": []}
    queries = mixture(args.queries, args.dim, args.topics, args.subtopics, seed=args.seed + 1)
    for threads in args.threads:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        run = {"threads": threads, "load_average_before": os.getloadavg()[0], "sizes": []}
        if args.compare_size:
            run["compare"] = compare_torch(
                mixture(args.compare_size, args.dim, args.topics, args.subtopics, seed=args.seed),
                queries,
                args.compare_k,
                args.repeats,
            )
        for n in args.sizes:
            run["sizes"].append(bench_size(n, args, queries))
        run["load_average_after"] = os.getloadavg()[0]
        out["runs"].append(run)
        print(
            f"load average: {run['load_average_before']:.1f} before, {run['load_average_after']:.1f} after ({threads} thread(s))"
        )
        if args.json:
            from saferclip.files import write_json_atomic

            write_json_atomic(args.json, out)
    if args.json:
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()

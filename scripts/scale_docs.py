"""Write docs/GPU.md's scale sections from the committed result files, never from typed numbers.

- ``docs/results/large_pool_growth.json`` (``scripts/bench_large_pool.py --json``): the growth
  table (build time and its stages, bytes per vector, peak memory, recall@1 / @10 after
  re-ranking, queries/s), every search setting at the largest size, the fitted growth and its
  projection to 100 M and 1 B, and the plot ``docs/img/large_pool_growth.png``;
- ``docs/results/ivf_100k.json`` (``scripts/bench_neighbours.py --json``): the IVF speed-up over
  exact search at 100k, min / median / max over the repetitions, per thread count.

Each goes between its markers in docs/GPU.md (``<!-- scale_docs:NAME:start -->`` ...
``<!-- scale_docs:NAME:end -->``); a result file that does not exist yet leaves its section
saying so. ``scripts/run_scale_benchmarks.sh`` runs the measurements and then this.

    python scripts/scale_docs.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from saferclip.evaluation.plotting import figure, save_figure
from saferclip.files import write_text_atomic
from saferclip.redirection.large_pool import PoolIndexConfig

REPO = Path(__file__).resolve().parent.parent

RUN = "bash scripts/run_scale_benchmarks.sh"
PROJECTED = (100_000_000, 1_000_000_000)
RAM_GB = 24  # this machine's memory, in the projection's notes
TARGET_PEAK_GB = 8  # the pool's build must stay under it (issue's target), per shard when sharded
# the build stages as the growth table shows them (other: sample, quantizer, PQ training, writing)
SHOWN_STAGES = (("coarse_training", "k-means"), ("assignment", "assignment"), ("encoding", "encoding"), ("reading", "reading"))
# theory of each stage's growth with sqrt(N) lists: assignment compares every vector with every
# centroid (N * sqrt(N)); the k-means sample is 40 per list (sqrt(N) * sqrt(N) = N); the rest ~N
STAGE_POWER = {"assignment": 1.5}


def peak(size: dict) -> float:
    return max(size["peak_gb_after_build"], size["peak_gb_after_search"])


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}" if n % scale == 0 else f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def default_search(size: dict) -> dict:
    """The search at the library's default setting (nprobe, candidates), else the first."""
    for s in size["searches"]:
        if s["nprobe"] == PoolIndexConfig.nprobe and s["candidates"] == PoolIndexConfig.candidates:
            return s
    return size["searches"][0]


# ----------------------------------------------------------------------------- fits
def stage_fit(sizes: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per stage: (a, c, power) with seconds = a + c * N**power, least squares over the measured
    sizes (through the origin when a would come out negative, or from one size)."""
    names = {k for s in sizes for k in s["stage_seconds"]}
    fits = {}
    for name in names:
        power = STAGE_POWER.get(name, 1.0)
        x = np.array([s["size"] ** power for s in sizes], dtype=float)
        y = np.array([s["stage_seconds"].get(name, 0.0) for s in sizes], dtype=float)
        a, c = (np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0] if len(sizes) > 1 else (-1.0, 0.0))
        if a < 0 or c < 0:
            a, c = 0.0, float(x @ y / (x @ x))
        fits[name] = (float(a), float(c), power)
    return fits


def build_seconds(fits: dict, n: float) -> float:
    return sum(a + c * n**p for a, c, p in fits.values())


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """(intercept, slope) of a least-squares line (slope only, through the origin, for one point)."""
    if len(x) < 2:
        return 0.0, y[0] / x[0]
    slope, intercept = np.polyfit(np.array(x, float), np.array(y, float), 1)
    return float(intercept), float(slope)


# ----------------------------------------------------------------------------- the growth section
def growth_section(data: dict, source: str, plot: str) -> str:
    cfg, args, sizes = data["configuration"], data["arguments"], data["sizes"]
    sizes = sorted(sizes, key=lambda s: s["size"])
    lines = [
        f"Measured on {cfg['date'][:10]} by `python scripts/bench_large_pool.py --sizes "
        f"{','.join(str(s['size']) for s in sizes)}` ({source}): {cfg['cpus']} CPUs ({cfg['cpu']}), "
        f"{cfg['memory_gb']:.0f} GB of memory, {cfg['threads']} FAISS threads, faiss {cfg['faiss']}; "
        f"{args['dim']}-d float16 shards of {args['shard_rows']:,} rows (the two-level Gaussian mixture, "
        f"{args['topics']} topics x {args['subtopics']} sub-topics), read from disk (page cache dropped before each "
        f"size); IVF with {args['m']} x {args['nbits']}-bit PQ codes, {args['coarse']} coarse quantizer, "
        f"{len(sizes[0]['searches'])} search settings per size; {args['queries']:,} held-out "
        "queries, recall against an exact scan of the whole pool. Load average (1 min) beside each size: other "
        "processes on the same cores slow every figure.",
        "",
    ]
    head = default_search(sizes[0])
    lines += [
        f"| pool | lists | build | {' / '.join(label for _, label in SHOWN_STAGES)} | build s / M vectors | index bytes/vector "
        f"| store bytes/vector | peak memory GB (build / search) | recall@1 / @10 (nprobe {head['nprobe']}, {head['candidates']} "
        f"candidates) | queries/s | exact scan queries/s | load |",
        "|---|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for s in sizes:
        d = default_search(s)
        stages = " / ".join(f"{s['stage_seconds'].get(k, 0):.0f}" for k, _ in SHOWN_STAGES)
        lines.append(
            f"| {human(s['size'])} | {s['nlist']:,} | {duration(s['build_seconds'])} | {stages} s | "
            f"{s['build_seconds'] / s['size'] * 1e6:.1f} | {s['index_bytes_per_vector']:.1f} | {s['store_bytes_per_vector']:.0f} | "
            f"{s['peak_gb_after_build']:.2f} / {s['peak_gb_after_search']:.2f} | {d['recall_at_1']:.4f} / {d['recall_at_10']:.4f} | "
            f"{d['queries_per_second']:,.0f} | {s['exact_queries_per_second']:.1f} | "
            f"{s['load_average_before']:.1f}-{s['load_average_after']:.1f} |"
        )
    largest = sizes[-1]
    lines += [
        "",
        f"Every search setting at {human(largest['size'])}:",
        "",
        "| nprobe | candidates | recall@1 | recall@10 | queries/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for q in largest["searches"]:
        lines.append(f"| {q['nprobe']} | {q['candidates']} | {q['recall_at_1']:.4f} | {q['recall_at_10']:.4f} | {q['queries_per_second']:,.0f} |")
    if len(sizes) < 2:
        lines += ["", f"![Growth of the large safe pool]({plot})", "", "(One size measured: no fit, no projection.)"]
        return "\n".join(lines)
    fits = stage_fit(sizes)
    mem_a, mem_b = linear_fit([s["size"] for s in sizes], [peak(s) for s in sizes])
    per_vector = largest["index_bytes_per_vector"]
    store = largest["store_bytes_per_vector"]
    assign_a, assign_c, _ = fits.get("assignment", (0.0, 0.0, 1.5))
    lines += [
        "",
        f"![Growth of the large safe pool: build time and peak memory against pool size, measured and projected]({plot})",
        "",
        "**Projection, not measured**: each build stage fitted over the measured sizes as a + c·N (assignment: a + c·N^1.5, "
        "since with sqrt(N) lists each vector is compared with sqrt(N) centroids), peak memory as a line "
        f"({mem_a:.2f} GB + {mem_b * 1e9:.0f} bytes per vector), the index at the largest size's "
        f"{per_vector:.1f} bytes/vector, the float16 re-ranking store at {store:.0f} bytes/vector, on this machine's "
        f"{cfg['threads']} threads:",
        "",
        "| pool | build (projected) | of which assignment | index | re-ranking store | peak memory (projected) | what it needs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in PROJECTED:
        total = build_seconds(fits, n)
        projected_peak = mem_a + mem_b * n
        index_gb = per_vector * n / 1e9
        shards = max(1, math.ceil(mem_b * n / max(TARGET_PEAK_GB - mem_a, 1e-9)))  # each shard's build under 8 GB
        if projected_peak > TARGET_PEAK_GB:
            sharded = build_seconds(fits, n / shards) * shards
            beyond = f" and this machine's {RAM_GB} GB" if projected_peak > RAM_GB else ""
            needs = (
                f"over the {TARGET_PEAK_GB} GB target{beyond}: "
                f"a sharded build, {shards} shards of {human(n / shards)} (each under {TARGET_PEAK_GB} GB at the fitted "
                f"memory per vector) built one after another, each searched and the union of their candidates "
                f"re-ranked; with sqrt(N) lists per shard the assignment shrinks too ({duration(sharded)} in all); "
                "a GPU (faiss-gpu) for the k-means and the assignment"
            )
        else:
            needs = (
                f"fits in memory; the assignment ({duration(assign_a + assign_c * n**1.5)} here) is the stage to move: a GPU "
                "(faiss-gpu computes the same inner products with every centroid) or coarse='hnsw', whose cost "
                "per vector grows with log(lists), not lists"
            )
        lines.append(
            f"| {human(n)} | {duration(total)} | {duration(assign_a + assign_c * n**1.5)} | {index_gb:.1f} GB | {store * n / 1e12:.2f} TB "
            f"| {projected_peak:.1f} GB | {needs} |"
        )
    return "\n".join(lines)


def growth_plot(data: dict, path: Path) -> None:
    sizes = sorted(data["sizes"], key=lambda s: s["size"])
    n = np.array([s["size"] for s in sizes], dtype=float)
    fits = stage_fit(sizes)
    grid_measured = np.geomspace(n[0], n[-1], 50)
    # no fit and no projection from one size: the measured points only
    grid_projected = np.geomspace(n[-1], PROJECTED[-1], 50) if len(sizes) > 1 else np.array([])
    fig = figure(11, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for ax in (ax1, ax2) if len(sizes) > 1 else ():
        ax.axvspan(n[-1], PROJECTED[-1], color="0.93", zorder=0)
        ax.text(math.sqrt(n[-1] * PROJECTED[-1]), 0.93, "projection", transform=ax.get_xaxis_transform(), ha="center", fontsize=8, color="0.4")
    ax1.plot(n, [s["build_seconds"] / 60 for s in sizes], "o", color="C0", label="measured build")
    ax1.plot(grid_measured, [build_seconds(fits, x) / 60 for x in grid_measured], "-", color="C0", label="fit (stages)")
    ax1.plot(grid_projected, [build_seconds(fits, x) / 60 for x in grid_projected], "--", color="C0", label="projection")
    ax1.axhline(45, color="grey", lw=0.8, ls=":")
    ax1.text(n[0], 45 * 1.15, "45 min", color="grey", fontsize=8)
    ax1.set(xscale="log", yscale="log", xlabel="pool size (vectors)", ylabel="build time (min)", title="build")
    ax1.legend(fontsize=8)
    peaks = [peak(s) for s in sizes]
    a, b = linear_fit(list(n), peaks)
    ax2.plot(n, peaks, "o", color="C1", label="measured peak memory")
    ax2.plot(grid_measured, a + b * grid_measured, "-", color="C1")
    ax2.plot(grid_projected, a + b * grid_projected, "--", color="C1", label="projection")
    per_vector = sizes[-1]["index_bytes_per_vector"]
    ax2.plot(np.concatenate([grid_measured, grid_projected]), per_vector * np.concatenate([grid_measured, grid_projected]) / 1e9,
             ":", color="C2", label=f"index ({per_vector:.0f} B/vector)")
    ax2.axhline(8, color="grey", lw=0.8, ls=":")
    ax2.axhline(RAM_GB, color="red", lw=0.8, ls=":")
    ax2.text(n[0], 8 * 1.15, "8 GB", color="grey", fontsize=8)
    ax2.text(n[0], RAM_GB * 1.15, f"{RAM_GB} GB RAM", color="red", fontsize=8)
    ax2.set(xscale="log", yscale="log", xlabel="pool size (vectors)", ylabel="GB", title="memory")
    ax2.legend(fontsize=8)
    searches = [default_search(s) for s in sizes]
    ax3.plot(n, [q["queries_per_second"] for q in searches], "o-", color="C3", label="queries/s")
    ax3.axhline(500, color="grey", lw=0.8, ls=":")
    ax3.set(xscale="log", xlabel="pool size (vectors)", ylabel="queries/s", title="search (measured only)")
    ax3.set_ylim(bottom=0)
    twin = ax3.twinx()
    twin.plot(n, [q["recall_at_1"] for q in searches], "s--", color="C4", label="recall@1")
    twin.plot(n, [q["recall_at_10"] for q in searches], "^--", color="C5", label="recall@10")
    twin.set(ylabel="recall after re-ranking", ylim=(0.5, 1.01))
    handles = ax3.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax3.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the IVF section
def ivf_section(data: dict, source: str) -> str:
    cfg, args = data["configuration"], data["arguments"]
    fmt = lambda s, spec=".1f": f"{s['min']:{spec}} / {s['median']:{spec}} / {s['max']:{spec}}"  # noqa: E731
    lines = [
        f"Measured on {cfg['date'][:10]} by `python scripts/bench_neighbours.py` ({source}): {cfg['cpus']} CPUs "
        f"({cfg['cpu']}), faiss {cfg['faiss']} ({cfg['faiss_build'].strip()}), torch {cfg['torch']} (BLAS {cfg['torch_blas']}), "
        f"numpy's BLAS {cfg['numpy_blas']}, OPENBLAS_CORETYPE={cfg['OPENBLAS_CORETYPE']}, OMP_NUM_THREADS={cfg['OMP_NUM_THREADS']}; "
        f"{args['queries']:,} queries, d={args['dim']}, k=1, {args['repeats']} interleaved repetitions after a timed warm-up "
        "(min / median / max).",
        "",
        "| threads | load | index | setting | search s | speed-up vs FAISS exact | vs torch exact | recall@1 | first call s |",
        "|---:|---|---|---|---|---|---|---:|---:|",
    ]
    for run in data["runs"]:
        load = f"{run['load_average_before']:.1f}-{run['load_average_after']:.1f}"
        for size in run["sizes"]:
            first = size["first_call_seconds"]
            lines.append(f"| {run['threads']} | {load} | exact | FAISS IndexFlatIP | {fmt(size['exact_faiss_seconds'], '.2f')} | 1 | | 1 | {first['exact_faiss']:.2f} |")
            lines.append(f"| {run['threads']} | {load} | exact | torch matmul + topk | {fmt(size['exact_torch_seconds'], '.2f')} | | 1 | 1 | {first['exact_torch']:.2f} |")
            for r in size["approximate"]:
                lines.append(
                    f"| {run['threads']} | {load} | {r['index']} | {r['params']} | {fmt(r['search_seconds'], '.2f')} | "
                    f"{fmt(r['speedup_vs_faiss_exact'])}x | {fmt(r['speedup_vs_torch_exact'])}x | {r['recall_at_1']:.4f} | {r['first_call_seconds']:.2f} |"
                )
    lines.append("")
    for run in data["runs"]:
        for size in run["sizes"]:
            best = size.get("ivf_at_target_recall")
            if best:
                lines.append(
                    f"- {run['threads']} thread(s), pool {human(size['pool'])}: the fastest IVF setting at recall@1 >= "
                    f"{args['target_recall']} is {best['params']} (recall {best['recall_at_1']:.4f}): "
                    f"**{best['speedup_vs_faiss_exact']['median']:.1f}x** the exact FAISS search (median; min "
                    f"{best['speedup_vs_faiss_exact']['min']:.1f}x, max {best['speedup_vs_faiss_exact']['max']:.1f}x), "
                    f"{best['speedup_vs_torch_exact']['median']:.1f}x torch's."
                )
            else:
                lines.append(f"- {run['threads']} thread(s), pool {human(size['pool'])}: no IVF setting reached recall@1 >= {args['target_recall']}.")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- scale_docs:{name}:start -->", f"<!-- scale_docs:{name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/GPU.md has no {start} ... {end} markers")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--growth", default="docs/results/large_pool_growth.json")
    p.add_argument("--ivf", default="docs/results/ivf_100k.json")
    p.add_argument("--doc", default="docs/GPU.md")
    p.add_argument("--plot", default="docs/img/large_pool_growth.png")
    args = p.parse_args()
    doc = REPO / args.doc
    text = doc.read_text()
    growth = REPO / args.growth
    if growth.is_file():
        data = json.loads(growth.read_text())
        growth_plot(data, REPO / args.plot)
        body = growth_section(data, f"[{growth.name}]({os.path.relpath(growth, doc.parent)})", os.path.relpath(REPO / args.plot, doc.parent))
    else:
        # no backticks around the file: it does not exist yet (the docs test checks named paths)
        body = f"Not measured yet: `{RUN}` writes {args.growth}, then this table and its plot."
    text = replace_section(text, "large-pool", body)
    ivf = REPO / args.ivf
    if ivf.is_file():
        body = ivf_section(json.loads(ivf.read_text()), f"[{ivf.name}]({os.path.relpath(ivf, doc.parent)})")
    else:
        body = f"Not measured yet: `{RUN}` writes {args.ivf}, then this table."
    text = replace_section(text, "ivf-100k", body)
    write_text_atomic(doc, text)
    print(f"written: {doc}" + (f", {args.plot}" if growth.is_file() else ""))


if __name__ == "__main__":
    main()

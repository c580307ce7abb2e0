"""docs/GPU.md's scale figures, generated from two committed result files: numbers that cannot
go stale.

- ``docs/results/large_pool_growth.json`` (``scripts/bench_large_pool.py --json``, source
  ``pool``): the large safe pool (:mod:`.large_pool`) built and searched at growing sizes;
- ``docs/results/ivf_100k.json`` (``scripts/bench_neighbours.py --json``, source ``ivf``): IVF
  against exact search (:mod:`.faiss_search`) at 100k, min / median / max over the repetitions.

The generators below render their tables; the documents' generated regions are rewritten and
checked by the one mechanism every result document uses (:mod:`saferclip.evaluation.doc_tables`,
``scripts/update_doc_tables.py``), under these names: ``pool-growth`` (how it was measured, and
per size the build time and its stages, bytes per vector, peak memory, recall@1 / @10 after
re-ranking at the library's default search, queries/s), ``pool-settings`` (every search setting
at the largest size), ``pool-projection`` (each stage's fitted growth and the projection to 100 M
and 1 B, labelled as one) and ``ivf-speedup`` (the IVF table and the fastest setting at the
target recall). The plot ``docs/img/large_pool_growth.png`` (:func:`draw_growth_plot`, region
``pool-plot``) is redrawn by ``update_doc_tables.py`` whenever the committed pool file is not the
one it was drawn from.

Until a file is committed its regions say the figures are not yet measured and how to measure
them (:func:`pending`): ``bash scripts/run_scale_benchmarks.sh``, for a quiet window.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SaferclipError
from .large_pool import PoolIndexConfig

RUN = "bash scripts/run_scale_benchmarks.sh"  # what measures both files (the pending note names it)
FILES = {"pool": "docs/results/large_pool_growth.json", "ivf": "docs/results/ivf_100k.json"}
PROJECTED = (100_000_000, 1_000_000_000)
TARGET_PEAK_GB = 8  # the pool's build must stay under it (issue 33's target), per shard when sharded
TARGET_BUILD_MINUTES = 45  # at 10 M
TARGET_QUERIES_PER_SECOND = 500
# the build stages as the growth table shows them (the rest: sample, quantizer, PQ training, writing)
SHOWN_STAGES = (
    ("coarse_training", "k-means"),
    ("assignment", "assignment"),
    ("encoding", "encoding"),
    ("reading", "reading"),
)
# each stage's growth with sqrt(N) lists: assignment compares every vector with every centroid
# (N * sqrt(N)); the k-means sample is 40 per list (sqrt(N) * sqrt(N) = N); the rest ~N
STAGE_POWER = {"assignment": 1.5}


class ScaleSummaryError(SaferclipError):
    """A scale result file the generators cannot use (one line naming what is missing)."""


def _reads(
    generator: Callable[[Mapping[str, Any], Mapping[str, str]], str],
) -> Callable[[Mapping[str, Any], Mapping[str, str]], str]:
    """A result file without a field the generator reads: one line naming it, not a traceback."""

    @functools.wraps(generator)
    def wrapped(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
        try:
            return generator(data, args)
        except KeyError as e:
            raise ScaleSummaryError(
                f"the result file has no field {e.args[0]!r} where {generator.__name__} reads it"
            ) from None
        except (TypeError, IndexError, ValueError) as e:
            raise ScaleSummaryError(f"the result file is not what {generator.__name__} reads ({e})") from None

    return wrapped


# ----------------------------------------------------------------------------- formatting
def human(n: float) -> str:
    """A pool size: ``1M``, ``2.5M``, ``100k``."""
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


def _spread(s: Mapping[str, float], spec: str = ".1f") -> str:
    return f"{s['min']:{spec}} / {s['median']:{spec}} / {s['max']:{spec}}"


# ----------------------------------------------------------------------------- fits
def peak(size: Mapping[str, Any]) -> float:
    """The size's peak resident memory in GB, build or search."""
    return max(size["peak_gb_after_build"], size["peak_gb_after_search"])


def sorted_sizes(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    sizes = sorted(data["sizes"], key=lambda s: s["size"])
    if not sizes:
        raise ScaleSummaryError("the result file measured no size")
    return sizes


def default_search(size: Mapping[str, Any]) -> Mapping[str, Any]:
    """The search at the library's default setting (nprobe, candidates), else the first."""
    for s in size["searches"]:
        if s["nprobe"] == PoolIndexConfig.nprobe and s["candidates"] == PoolIndexConfig.candidates:
            return s
    return size["searches"][0]


def stage_fit(sizes: list[Mapping[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Per stage: ``(a, c, power)`` with seconds = a + c * N**power, least squares over the
    measured sizes (through the origin when a or c would come out negative, or from one size)."""
    names = sorted({k for s in sizes for k in s["stage_seconds"]})
    fits = {}
    for name in names:
        power = STAGE_POWER.get(name, 1.0)
        x = np.array([s["size"] ** power for s in sizes], dtype=float)
        y = np.array([s["stage_seconds"].get(name, 0.0) for s in sizes], dtype=float)
        a, c = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0] if len(sizes) > 1 else (-1.0, 0.0)
        if a < 0 or c < 0:
            a, c = 0.0, float(x @ y / (x @ x))
        fits[name] = (float(a), float(c), power)
    return fits


def build_seconds(fits: Mapping[str, tuple[float, float, float]], n: float) -> float:
    """The fitted build time of a pool of ``n`` vectors: the sum of its stages."""
    return sum(a + c * n**p for a, c, p in fits.values())


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """``(intercept, slope)`` of a least-squares line (through the origin for one point)."""
    if len(x) < 2:
        return 0.0, y[0] / x[0]
    slope, intercept = np.polyfit(np.array(x, float), np.array(y, float), 1)
    return float(intercept), float(slope)


# ----------------------------------------------------------------------------- the pool's regions
@_reads
def pool_growth(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """How the growth was measured, then one row per size."""
    cfg, run, sizes = data["configuration"], data["arguments"], sorted_sizes(data)
    lines = [
        f"Measured on {cfg['date'][:10]} by `python scripts/bench_large_pool.py --sizes "
        f"{','.join(str(s['size']) for s in sizes)}` (`{FILES['pool']}`): {cfg['cpus']} CPUs ({cfg['cpu']}), "
        f"{cfg['memory_gb']:.0f} GB of memory, {cfg['threads']} FAISS threads, faiss {cfg['faiss']}; "
        f"{run['dim']}-d float16 shards of {run['shard_rows']:,} rows (the two-level Gaussian mixture, "
        f"{run['topics']} topics x {run['subtopics']} sub-topics), read from disk (page cache dropped before each "
        f"size); IVF with {run['m']} x {run['nbits']}-bit PQ codes, {run['coarse']} coarse quantizer, "
        f"{len(sizes[0]['searches'])} search settings per size; {run['queries']:,} held-out "
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
    return "\n".join(lines)


@_reads
def pool_settings(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """Every search setting at the largest size."""
    largest = sorted_sizes(data)[-1]
    lines = [
        f"Every search setting at {human(largest['size'])}:",
        "",
        "| nprobe | candidates | recall@1 | recall@10 | queries/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for q in largest["searches"]:
        lines.append(
            f"| {q['nprobe']} | {q['candidates']} | {q['recall_at_1']:.4f} | {q['recall_at_10']:.4f} | {q['queries_per_second']:,.0f} |"
        )
    return "\n".join(lines)


@_reads
def pool_projection(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """Each stage's fitted growth and the projection to 100 M and 1 B (labelled as one)."""
    cfg, sizes = data["configuration"], sorted_sizes(data)
    if len(sizes) < 2:
        return "(One size measured: no fit, no projection.)"
    largest = sizes[-1]
    fits = stage_fit(sizes)
    mem_a, mem_b = linear_fit([s["size"] for s in sizes], [peak(s) for s in sizes])
    per_vector, store = largest["index_bytes_per_vector"], largest["store_bytes_per_vector"]
    assign_a, assign_c, _ = fits.get("assignment", (0.0, 0.0, 1.5))
    ram_gb = cfg["memory_gb"]
    lines = [
        "**Projection, not measured**: each build stage fitted over the measured sizes as a + c·N (assignment: a + c·N^1.5, "
        "since with sqrt(N) lists each vector is compared with sqrt(N) centroids), peak memory as a line "
        f"({mem_a:.2f} GB + {mem_b * 1e9:.0f} bytes per vector), the index at the largest size's "
        f"{per_vector:.1f} bytes/vector, the float16 re-ranking store at {store:.0f} bytes/vector, on the measuring machine's "
        f"{cfg['threads']} threads:",
        "",
        "| pool | build (projected) | of which assignment | index | re-ranking store | peak memory (projected) | what it needs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in PROJECTED:
        total = build_seconds(fits, n)
        projected_peak = mem_a + mem_b * n
        assignment = assign_a + assign_c * n**1.5
        if projected_peak > TARGET_PEAK_GB:
            shards = max(
                1, math.ceil(mem_b * n / max(TARGET_PEAK_GB - mem_a, 1e-9))
            )  # each shard's build under the target
            sharded = build_seconds(fits, n / shards) * shards
            beyond = f" and the measuring machine's {ram_gb:.0f} GB" if projected_peak > ram_gb else ""
            needs = (
                f"over the {TARGET_PEAK_GB} GB target{beyond}: "
                f"a sharded build, {shards} shards of {human(n / shards)} (each under {TARGET_PEAK_GB} GB at the fitted "
                f"memory per vector) built one after another, each searched and the union of their candidates "
                f"re-ranked; with sqrt(N) lists per shard the assignment shrinks too ({duration(sharded)} in all); "
                "a GPU (faiss-gpu) for the k-means and the assignment"
            )
        else:
            needs = (
                f"fits in memory; the assignment ({duration(assignment)} here) is the stage to move: a GPU "
                "(faiss-gpu computes the same inner products with every centroid) or coarse='hnsw', whose cost "
                "per vector grows with log(lists), not lists"
            )
        lines.append(
            f"| {human(n)} | {duration(total)} | {duration(assignment)} | {per_vector * n / 1e9:.1f} GB | {store * n / 1e12:.2f} TB "
            f"| {projected_peak:.1f} GB | {needs} |"
        )
    return "\n".join(lines)


def draw_growth_plot(data: Mapping[str, Any], path: Path) -> None:
    """docs/img/large_pool_growth.png: build time, memory and search against the pool size,
    measured (points), fitted (lines) and projected (dashed, on a grey band)."""
    from ..evaluation.plotting import figure, save_figure  # matplotlib only when a plot is drawn

    sizes = sorted_sizes(data)
    n = np.array([s["size"] for s in sizes], dtype=float)
    fits = stage_fit(sizes)
    grid_measured = np.geomspace(n[0], n[-1], 50)
    # no fit and no projection from one size: the measured points only
    grid_projected = np.geomspace(n[-1], PROJECTED[-1], 50) if len(sizes) > 1 else np.array([])
    ram_gb = data["configuration"]["memory_gb"]
    fig = figure(11, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for ax in (ax1, ax2) if len(sizes) > 1 else ():
        ax.axvspan(n[-1], PROJECTED[-1], color="0.93", zorder=0)
        ax.text(
            math.sqrt(n[-1] * PROJECTED[-1]),
            0.93,
            "projection",
            transform=ax.get_xaxis_transform(),
            ha="center",
            fontsize=8,
            color="0.4",
        )
    ax1.plot(n, [s["build_seconds"] / 60 for s in sizes], "o", color="C0", label="measured build")
    ax1.plot(grid_measured, [build_seconds(fits, x) / 60 for x in grid_measured], "-", color="C0", label="fit (stages)")
    ax1.plot(
        grid_projected, [build_seconds(fits, x) / 60 for x in grid_projected], "--", color="C0", label="projection"
    )
    ax1.axhline(TARGET_BUILD_MINUTES, color="grey", lw=0.8, ls=":")
    ax1.text(n[0], TARGET_BUILD_MINUTES * 1.15, f"{TARGET_BUILD_MINUTES} min", color="grey", fontsize=8)
    ax1.set(xscale="log", yscale="log", xlabel="pool size (vectors)", ylabel="build time (min)", title="build")
    ax1.legend(fontsize=8)
    peaks = [peak(s) for s in sizes]
    a, b = linear_fit(list(n), peaks)
    ax2.plot(n, peaks, "o", color="C1", label="measured peak memory")
    ax2.plot(grid_measured, a + b * grid_measured, "-", color="C1")
    ax2.plot(grid_projected, a + b * grid_projected, "--", color="C1", label="projection")
    per_vector = sizes[-1]["index_bytes_per_vector"]
    grid = np.concatenate([grid_measured, grid_projected])
    ax2.plot(grid, per_vector * grid / 1e9, ":", color="C2", label=f"index ({per_vector:.0f} B/vector)")
    ax2.axhline(TARGET_PEAK_GB, color="grey", lw=0.8, ls=":")
    ax2.axhline(ram_gb, color="red", lw=0.8, ls=":")
    ax2.text(n[0], TARGET_PEAK_GB * 1.15, f"{TARGET_PEAK_GB} GB", color="grey", fontsize=8)
    ax2.text(n[0], ram_gb * 1.15, f"{ram_gb:.0f} GB RAM", color="red", fontsize=8)
    ax2.set(xscale="log", yscale="log", xlabel="pool size (vectors)", ylabel="GB", title="memory")
    ax2.legend(fontsize=8)
    searches = [default_search(s) for s in sizes]
    ax3.plot(n, [q["queries_per_second"] for q in searches], "o-", color="C3", label="queries/s")
    ax3.axhline(TARGET_QUERIES_PER_SECOND, color="grey", lw=0.8, ls=":")
    ax3.set(xscale="log", xlabel="pool size (vectors)", ylabel="queries/s", title="search (measured only)")
    ax3.set_ylim(bottom=0)
    twin = ax3.twinx()
    twin.plot(n, [q["recall_at_1"] for q in searches], "s--", color="C4", label="recall@1")
    twin.plot(n, [q["recall_at_10"] for q in searches], "^--", color="C5", label="recall@10")
    twin.set(ylabel="recall after re-ranking", ylim=(0.5, 1.01))
    handles = ax3.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax3.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left")
    save_figure(fig, path)


GROWTH_PLOT_CAPTION = (
    "Growth of the large safe pool: build time, memory and search against pool size, measured and projected"
)


# ----------------------------------------------------------------------------- the IVF region
@_reads
def ivf_speedup(data: Mapping[str, Any], args: Mapping[str, str]) -> str:
    """The IVF benchmark's configuration, every setting's times (min / median / max), and the
    fastest IVF setting at the target recall, per thread count."""
    cfg, run_args = data["configuration"], data["arguments"]
    lines = [
        f"Measured on {cfg['date'][:10]} by `python scripts/bench_neighbours.py` (`{FILES['ivf']}`): {cfg['cpus']} CPUs "
        f"({cfg['cpu']}), faiss {cfg['faiss']} ({cfg['faiss_build'].strip()}), torch {cfg['torch']} (BLAS {cfg['torch_blas']}), "
        f"numpy's BLAS {cfg['numpy_blas']}, OPENBLAS_CORETYPE={cfg['OPENBLAS_CORETYPE']}, OMP_NUM_THREADS={cfg['OMP_NUM_THREADS']}; "
        f"{run_args['queries']:,} queries, d={run_args['dim']}, k=1, {run_args['repeats']} interleaved repetitions after a timed warm-up "
        "(min / median / max).",
        "",
        "| threads | load | index | setting | search s | speed-up vs FAISS exact | vs torch exact | recall@1 | first call s |",
        "|---:|---|---|---|---|---|---|---:|---:|",
    ]
    for run in data["runs"]:
        load = f"{run['load_average_before']:.1f}-{run['load_average_after']:.1f}"
        for size in run["sizes"]:
            first = size["first_call_seconds"]
            lines.append(
                f"| {run['threads']} | {load} | exact | FAISS IndexFlatIP | {_spread(size['exact_faiss_seconds'], '.2f')} | 1 | | 1 | "
                f"{first['exact_faiss']:.2f} |"
            )
            lines.append(
                f"| {run['threads']} | {load} | exact | torch matmul + topk | {_spread(size['exact_torch_seconds'], '.2f')} | | 1 | 1 | "
                f"{first['exact_torch']:.2f} |"
            )
            for r in size["approximate"]:
                lines.append(
                    f"| {run['threads']} | {load} | {r['index']} | {r['params']} | {_spread(r['search_seconds'], '.2f')} | "
                    f"{_spread(r['speedup_vs_faiss_exact'])}x | {_spread(r['speedup_vs_torch_exact'])}x | {r['recall_at_1']:.4f} | "
                    f"{r['first_call_seconds']:.2f} |"
                )
    lines.append("")
    for run in data["runs"]:
        for size in run["sizes"]:
            best = size.get("ivf_at_target_recall")
            if best:
                faiss_speedup = best["speedup_vs_faiss_exact"]
                lines.append(
                    f"- {run['threads']} thread(s), pool {human(size['pool'])}: the fastest IVF setting at recall@1 >= "
                    f"{run_args['target_recall']} is {best['params']} (recall {best['recall_at_1']:.4f}): "
                    f"**{faiss_speedup['median']:.1f}x** the exact FAISS search (median; min {faiss_speedup['min']:.1f}x, "
                    f"max {faiss_speedup['max']:.1f}x), {best['speedup_vs_torch_exact']['median']:.1f}x torch's."
                )
            else:
                lines.append(
                    f"- {run['threads']} thread(s), pool {human(size['pool'])}: no IVF setting reached recall@1 >= "
                    f"{run_args['target_recall']}."
                )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- before measuring
def pending(name: str, block: bool) -> str:
    """What a region shows while its result file is not committed: not yet measured, and the
    command that measures it (in full where a file's first region stands, briefly in the others)."""
    if not block:
        return "not yet measured"
    source = GENERATORS[name][0] if name in GENERATORS else "pool"
    if name in ("pool-growth", "ivf-speedup"):
        return (
            f"*Not yet measured: `{RUN}` measures it in a quiet window (every figure is a timing), "
            f"writes `{FILES[source]}` and regenerates this page.*"
        )
    return f"*Not yet measured (`{RUN}`).*"


# name -> (source, generator, block: its own lines between the markers), for saferclip.evaluation.doc_tables
GENERATORS: dict[str, tuple[str, Callable[[Mapping[str, Any], Mapping[str, str]], str], bool]] = {
    "pool-growth": ("pool", pool_growth, True),
    "pool-settings": ("pool", pool_settings, True),
    "pool-projection": ("pool", pool_projection, True),
    "ivf-speedup": ("ivf", ivf_speedup, True),
}

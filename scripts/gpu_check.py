"""GPU timings: every GPU path of saferclip run and timed by one command.

    python scripts/gpu_check.py                         # a GPU if torch sees one, else the CPU form
    python scripts/gpu_check.py --quick                 # smaller sizes (the first minutes on a new GPU)
    python scripts/gpu_check.py --device cpu            # the reduced CPU form (what the tests run)
    python scripts/gpu_check.py --json $OUT/gpu_check.json --parts 1,3

Whether the GPU paths give the right results is pytest's: ``python -m pytest -m gpu``
(``tests/test_gpu.py``: the cache builder and the exact neighbour search against their
references, ``saferclip-train trainer=gpu`` and ``trainer=ddp``, bf16-mixed against fp32).
This script measures what they cost, on random-init models (nothing is downloaded), with the
measurements of :mod:`saferclip.benchmarks`:

  1  the training step in bf16 autocast: saferclip's Lightning step against a bare PyTorch
     step on the same encoders and batches (:func:`saferclip.benchmarks.train_step.measure`);
     target lightning / bare <= 1.05; the peak GPU memory of each.
  2  the embedding-cache builder (image DataLoader workers) against the plain batched loop
     (:func:`saferclip.benchmarks.embedding_cache.compare`); target plain / builder time >= 0.95.
  3  the exact neighbour search on the GPU (FAISS's GPU build when it loads, else torch
     matmul + topk on the GPU) against faiss-cpu at 1M x 768
     (:func:`saferclip.benchmarks.vectors.mixture`): speed-up, and top-1 / top-k agreement.
  4  the real-size rehearsal (``saferclip-rehearse``): ViT-B/32 and ViT-L/14 (random init,
     224 px, the ``visu_vitl14`` preset's LoRA r16) on the rehearsal world (JPEG at 224 px
     in ViSU's layout) through cache, neighbours, training steps, evaluation and both
     exports: each stage's items/s and peak GPU memory. ``--rehearsal-items 165000`` runs it
     at ViSU's full size (rendering that world alone takes ~20 min of one CPU core).

On a CPU (no CUDA, or ``--device cpu``) the same measurements run in a reduced form: the
tiny architectures (``saferclip-micro``, ``saferclip-toy``), small sizes, bf16 autocast on
the CPU; the table and the JSON then say plainly that no GPU figure was measured. One table
is printed and a JSON written (device, GPU or "not measured: no GPU", versions, FAISS's GPU
status, each measurement's figures and status).

A measurement's status is ``measured``, ``failed: <why>`` (it broke) or ``skipped: <why>``
(what cannot run here: no CUDA, no bf16 on this GPU, out of GPU memory). Timing targets are
figures to read, marked met / missed, never a failure: the exit code is 0 when every
measurement that ran finished, 1 when one broke.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# progress bars (the cache builder's) would bury the table; tqdm reads this when imported
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

# faiss's OpenBLAS kernels are chosen when it loads: as the commands do, before importing it
from saferclip.app.cli import prefer_fast_openblas  # noqa: E402

prefer_fast_openblas()
from saferclip.benchmarks import embedding_cache, train_step  # noqa: E402
from saferclip.benchmarks.vectors import mixture  # noqa: E402
from saferclip.redirection.faiss_search import (  # noqa: E402, I001
    build_neighbour_index,
    exact_neighbours_torch,
    faiss_gpu_status,
)

NO_GPU = "not measured: no GPU"
# architecture name of the benchmarks -> (open_clip architecture, weights)
ARCHS = {
    "micro": ("saferclip-micro", None),
    "toy": ("saferclip-toy", "toy_base"),
    "vit-b-32": ("ViT-B-32", None),
    "vit-l-14": ("ViT-L-14", None),
}
TRAIN_STEP_TARGET = 1.05  # lightning / bare, median step time
CACHE_TARGET = 0.95  # plain loop / cache builder, wall time
PARTS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Sizes:
    """How big each check is; one preset per device (and ``--quick``)."""

    train: tuple[tuple[str, str], ...]  # (model, precision) of part 1
    train_batch: int
    train_batches: int  # distinct batches, cycled
    train_steps: int
    train_warmup: int
    cache: tuple[tuple[str, int], ...]  # (model, quadruplets) of part 2
    cache_repeats: int
    cache_workers: int
    pool: int
    dim: int
    queries: int
    k: int
    rehearsal: tuple[tuple[str, int, int, int], ...] = ()  # (model override, items, steps, batch) of part 4


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 2))


PRESETS = {
    "gpu": Sizes(
        train=(("vit-b-32", "bf16-mixed"), ("vit-l-14", "bf16-mixed")),
        train_batch=48,  # the ViT-L/14 preset's batch
        train_batches=2,
        train_steps=10,
        train_warmup=3,
        cache=(("vit-b-32", 2000), ("vit-l-14", 500)),
        cache_repeats=2,
        cache_workers=_workers(),
        pool=1_000_000,
        dim=768,
        queries=10_000,
        k=5,
        rehearsal=(("vit_b32_random", 8192, 50, 48), ("vit_l14_random", 8192, 50, 48)),
    ),
    "gpu-quick": Sizes(
        train=(("vit-b-32", "bf16-mixed"), ("vit-l-14", "bf16-mixed")),
        train_batch=48,
        train_batches=2,
        train_steps=4,
        train_warmup=2,
        cache=(("vit-b-32", 500), ("vit-l-14", 128)),
        cache_repeats=1,
        cache_workers=_workers(),
        pool=100_000,
        dim=768,
        queries=2_000,
        k=5,
        rehearsal=(("vit_b32_random", 1024, 10, 48), ("vit_l14_random", 1024, 10, 48)),
    ),
    # the CPU form: the micro model in bf16 (the autocast paths), the toy model in fp32 (the
    # CPU's own figure)
    "cpu": Sizes(
        train=(("micro", "bf16-mixed"), ("toy", "32-true")),
        train_batch=8,
        train_batches=2,
        train_steps=3,
        train_warmup=1,
        cache=(("micro", 96),),
        cache_repeats=1,
        cache_workers=2,
        pool=20_000,
        dim=768,
        queries=1_000,
        k=5,
        rehearsal=(("micro", 12, 1, 4),),
    ),
}


class Unavailable(Exception):
    """A check that cannot run here (reported as ``skipped: <message>``, not a failure)."""


@dataclass
class Check:
    part: int
    name: str
    status: str = "measured"
    summary: str = ""
    target: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


@dataclass
class Env:
    device: torch.device
    sizes: Sizes
    work: Path
    toy_dir: Path
    gpu: dict | None
    skip_all: str | None = None  # every check skipped (e.g. --device cuda without CUDA)
    rehearsal_items: int | None = None  # part 4 at this size instead of the preset's

    @property
    def cache_dir(self) -> Path:
        """Frozen-embedding caches of the small toy world, shared by part 1's models (the key
        tells them apart)."""
        return self.work / "embedding_cache"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def accelerator(self) -> str:
        return "gpu" if self.cuda else "cpu"

    def need_bf16(self) -> None:
        if self.cuda and not self.gpu["bf16"]:
            raise Unavailable(
                f"{self.gpu['name']} (compute capability {self.gpu['capability']}) has no bf16; "
                "the GPU presets train in bf16-mixed"
            )


# ---------------------------------------------------------------- machine and versions


def bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16": bf16_supported(),
        "driver": None,
    }
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in ("lightning", "open_clip_torch", "faiss-cpu", "faiss-gpu", "numpy", "hydra-core"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["saferclip_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        out["saferclip_commit"] = None
    return out


def arch_weights(name: str) -> tuple[str, str | None]:
    from saferclip.model.build import default_base_checkpoint

    arch, weights = ARCHS[name]
    if weights == "toy_base":
        base = default_base_checkpoint()
        weights = str(base) if base.is_file() else None
    return arch, weights


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------- part 1: training step


def prebuild_cache(cfg, device: torch.device) -> None:
    """The frozen-embedding cache of the run, built on ``device``: the datamodule builds it
    with the model on the CPU, which for ViT-L/14 would take most of this check's time. The
    cache key does not depend on the device, so the datamodule then reuses it."""
    from saferclip.app.hydra_utils import to_container
    from saferclip.data.splits import load_split
    from saferclip.model.build import build_clip
    from saferclip.redirection.cache import build_or_load_cache
    from saferclip.toyworld.generate import ensure_toy_world

    data = to_container(cfg.data)
    ensure_toy_world(data)
    bundle = build_clip(cfg.model.arch, cfg.model.pretrained, device=device)
    build_or_load_cache(
        bundle, load_split(data, "train"), cfg.paths.cache_dir, batch_size=int(data["eval_batch_size"]), progress=False
    )
    del bundle
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_gpu(env: Env) -> None:
    """Give the GPU memory of a finished check back (Lightning's trainer holds cycles)."""
    if env.cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def check_train_step(env: Env, model: str, precision: str, check: Check) -> None:
    if precision == "bf16-mixed":
        env.need_bf16()
    s = env.sizes
    work = env.work / "train_step" / model
    cfg = train_step.compose(
        model, "saferclip", env.toy_dir, env.cache_dir, s.train_batch, extra=("data.eval_batch_size=256",)
    )
    prebuild_cache(cfg, env.device)
    r = train_step.measure(
        cfg,
        work,
        batches=s.train_batches,
        steps=s.train_steps,
        warmup=s.train_warmup,
        accelerator=env.accelerator,
        precision=precision,
        frozen=False,
    )
    ratio = r["ratio_median"]["lightning"]
    check.figures = {"model": model, "precision": precision, "batch": s.train_batch, **r}
    peak = r["peak_memory_bytes"]
    check.summary = (
        f"lightning {1000 * r['median_s']['lightning']:.1f} ms, bare {1000 * r['median_s']['bare']:.1f} ms, "
        f"ratio {ratio:.3f} (min-based {r['ratio_min']['lightning']:.3f})"
        + (f", peak {gib(peak['lightning'])} (bare {gib(peak['bare'])})" if env.cuda else "")
    )
    check.target = f"<= {TRAIN_STEP_TARGET}: {'met' if ratio <= TRAIN_STEP_TARGET else 'missed'}"
    free_gpu(env)


# ---------------------------------------------------------------- part 2: embedding cache


def check_cache(env: Env, model: str, items: int, world: Path, check: Check) -> None:
    from saferclip.data.records import Mode
    from saferclip.model.build import build_clip
    from saferclip.redirection.cache import embed_plain

    s = env.sizes
    arch, weights = arch_weights(model)
    bundle = build_clip(arch, weights, device=env.device)
    qset = embedding_cache.toy_quadruplets(world, Mode.FULL, items)
    if len(qset) < items:
        raise RuntimeError(f"the toy world has {len(qset)} training items, {items} wanted")
    # warm-up (CUDA context, kernels, cuDNN's choice of algorithms) outside the timed runs
    embed_plain(bundle, embedding_cache.toy_quadruplets(world, Mode.FULL, 16), 16)
    r = embedding_cache.compare(
        f"{model} ({env.device.type})", bundle, qset, 256, s.cache_repeats, env.work / "cache" / model, s.cache_workers
    )
    check.figures = {"model": model, "arch": arch, **r}
    check.summary = (
        f"{r['inputs']} inputs: builder {r['cache_s']:.2f} s ({r['inputs_per_s']:.0f}/s, {r['num_workers']} workers), "
        f"plain {r['plain_s']:.2f} s, ratio {r['ratio']:.3f}, max |diff| {r['max_diff']:.1e}"
    )
    check.target = f">= {CACHE_TARGET}: {'met' if r['ratio'] >= CACHE_TARGET else 'missed'}"
    del bundle
    free_gpu(env)


# ---------------------------------------------------------------- part 3: neighbour index


def check_neighbours(env: Env, check: Check) -> None:
    import numpy as np

    s = env.sizes
    faiss_status = faiss_gpu_status()
    pool = mixture(s.pool, s.dim, 200, 50, seed=0)
    queries = mixture(s.queries, s.dim, 200, 50, seed=1)
    reference = build_neighbour_index(queries, pool, k=s.k, index="exact", device="cpu")
    if env.cuda and faiss_status["usable"]:
        backend = "faiss-gpu"
        result = build_neighbour_index(queries, pool, k=s.k, index="exact", device="cuda")
    else:
        backend = f"torch ({env.device.type})"
        matmul = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # exact float32, no TF32
        try:
            # query chunks of 1024: the [1024, 1M] similarity block is 4 GB in float32
            result = exact_neighbours_torch(queries, pool, k=s.k, chunk=1024, device=env.device)
        finally:
            torch.set_float32_matmul_precision(matmul)
    top1 = (reference.indices[:, 0] == result.indices[:, 0]).float().mean().item()
    topk = float(
        np.mean([len(set(a) & set(b)) / s.k for a, b in zip(reference.indices.tolist(), result.indices.tolist())])
    )
    sim_diff = (reference.similarities - result.similarities).abs().max().item()
    speedup = reference.search_seconds / result.search_seconds
    check.name = f"neighbours {s.pool:,} x {s.dim}: {backend} vs faiss-cpu"
    check.figures = {
        "backend": backend,
        "faiss": faiss_status,
        "pool": s.pool,
        "dim": s.dim,
        "queries": s.queries,
        "k": s.k,
        "faiss_cpu_s": reference.search_seconds,
        "device_s": result.search_seconds,
        "speedup": speedup,
        "top1_agreement": top1,
        "topk_agreement": topk,
        "max_sim_diff": sim_diff,
        "cpu_threads": torch.get_num_threads(),
    }
    check.summary = (
        f"top-1 {100 * top1:.2f}%, top-{s.k} {100 * topk:.2f}%, max |sim diff| {sim_diff:.1e}; "
        f"faiss-cpu {reference.search_seconds:.2f} s, {backend} {result.search_seconds:.2f} s, speed-up {speedup:.1f}x"
    )
    if env.cuda and not faiss_status["usable"]:
        check.summary += f" [{faiss_status['note']}]"


# ---------------------------------------------------------------- part 4: the rehearsal


def check_rehearsal(env: Env, model: str, items: int, steps: int, batch: int, check: Check) -> None:
    from saferclip.app.pipelines.rehearse import rehearse

    workers = env.sizes.cache_workers if env.cuda else 0
    rows = rehearse(env.work / "rehearsal" / model, [f"model={model}"], items, steps, env.device.type, batch, workers)
    check.figures = {"model": model, "items": items, "steps": steps, "batch": batch, "stages": rows}
    check.summary = ", ".join(f"{r['stage']} {r['items_per_s']:.1f}/s {r['peak_gb']:.1f} GB" for r in rows)
    free_gpu(env)


# ---------------------------------------------------------------- running and reporting


def run_check(env: Env, check: Check, fn: Callable[[], None], index: int, total: int) -> Check:
    print(f"[{index}/{total}] {check.name} ...", flush=True)
    start = time.perf_counter()
    if env.skip_all:
        check.status = f"skipped: {env.skip_all}"
    else:
        try:
            fn()
        except Unavailable as e:
            check.status = f"skipped: {e}"
        except torch.cuda.OutOfMemoryError:
            gpu = env.gpu or {}
            check.status = f"skipped: out of GPU memory ({gpu.get('name')}, {gpu.get('memory_gib')} GiB)"
            free_gpu(env)
        except Exception as e:  # a check that ran and broke: reported, and the others still run
            check.status = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            check.error = traceback.format_exc()
        if check.failed and check.error:  # the traceback, or the end of a failed run's output
            print(check.error, file=sys.stderr, flush=True)
    check.seconds = time.perf_counter() - start
    print(f"      {check.status} ({check.seconds:.1f} s) {check.summary}", flush=True)
    return check


def plan(env: Env, parts: set[int]) -> list[tuple[Check, Callable[[], None]]]:
    from saferclip.toyworld.generate import ToySizes, make_toy_world

    s = env.sizes
    jobs: list[tuple[Check, Callable[[], None]]] = []
    if 1 in parts:
        for model, precision in s.train:
            c = Check(1, f"train step {model} {precision}, batch {s.train_batch}")
            jobs.append((c, lambda c=c, m=model, p=precision: check_train_step(env, m, p, c)))
    if 2 in parts:
        cache_world = env.work / "cache_world"
        items = max(n for _, n in s.cache)
        world_sizes = ToySizes(
            train=items, validation=8, test=8, nsfw_caps=8, zeroshot_per_class=1, scene_per_class=1, distractors=8
        )
        for model, n in s.cache:
            c = Check(2, f"embedding cache {model}, {n} quadruplets, {s.cache_workers} workers")

            def job(c=c, m=model, n=n) -> None:
                make_toy_world(cache_world, seed=0, sizes=world_sizes)
                check_cache(env, m, n, cache_world, c)

            jobs.append((c, job))
    if 3 in parts:
        c = Check(3, f"neighbours {s.pool:,} x {s.dim}")
        jobs.append((c, lambda c=c: check_neighbours(env, c)))
    if 4 in parts:
        for model, items, steps, batch in s.rehearsal:
            items = env.rehearsal_items or items
            c = Check(4, f"rehearsal {model}, {items} quadruplets, {steps} steps of {batch}")
            jobs.append((c, lambda c=c, m=model, n=items, t=steps, b=batch: check_rehearsal(env, m, n, t, b, c)))
    return jobs


def print_table(env: Env, checks: list[Check], report: dict) -> None:
    gpu = env.gpu
    where = (
        f"{gpu['name']} x{gpu['count']} ({gpu['memory_gib']} GiB, capability {gpu['capability']}, driver {gpu['driver']})"
        if env.cuda and gpu
        else NO_GPU
    )
    v = report["versions"]
    print()
    print(f"saferclip GPU timings, {report['created']}, device {env.device.type}, preset {report['preset']}")
    print(f"GPU: {where}")
    print(
        f"torch {v['torch']} (CUDA {v['torch_cuda']}), lightning {v['lightning']}, open_clip {v['open_clip_torch']}, "
        f"faiss {report['faiss']['faiss_version']} ({report['faiss']['note']}), Python {v['python']}"
    )
    rows = [("#", "check", "status", "s", "target", "figures")]
    for c in checks:
        rows.append((str(c.part), c.name, c.status, f"{c.seconds:.1f}", c.target or "-", c.summary or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(col.ljust(w) for col, w in zip(r[:5], widths)) + "  " + r[5])
    counts = report["counts"]
    print(
        f"{counts['measured']} measured, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"{report['total_seconds']:.0f} s in all"
    )
    print("Whether the GPU paths give the right results: python -m pytest -m gpu (tests/test_gpu.py).")
    if env.skip_all:
        print(f"GPU figures: not measured: {env.skip_all}.")
    elif not env.cuda:
        print("GPU figures: not measured (no GPU here): this was the reduced CPU form of every measurement.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smaller GPU sizes (the CPU form is always small)")
    p.add_argument("--parts", default="1,2,3,4", help="which measurements, comma-separated (default all)")
    p.add_argument(
        "--rehearsal-items", type=int, default=None, help="part 4's training quadruplets (165000: ViSU's size)"
    )
    p.add_argument(
        "--json", type=Path, default=None, help="where to write the JSON (default outputs/gpu_check/<time>.json)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch / FAISS CPU threads (default: all CPUs)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    try:
        parts = {int(x) for x in args.parts.split(",") if x.strip()}
    except ValueError:
        p.error(f"--parts: comma-separated numbers from 1 to {len(PARTS)}, got {args.parts!r}")
    if not parts <= set(PARTS):
        p.error(f"--parts: measurements are numbered 1 to {len(PARTS)}, got {args.parts!r}")

    started = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    quiet()
    gpu = gpu_info()
    skip_all = None
    if args.device == "cuda" and gpu is None:
        skip_all = f"--device cuda, but torch {torch.__version__} sees no CUDA device"
    # --device cuda without CUDA: the GPU measurements are listed, each skipped, none run
    cuda = args.device == "cuda" or (args.device == "auto" and gpu is not None)
    device = torch.device("cuda" if cuda else "cpu")
    preset = ("gpu-quick" if args.quick else "gpu") if cuda else "cpu"
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)

    work = Path(tempfile.mkdtemp(prefix="saferclip_gpu_check_", dir=args.work_dir))
    env = Env(device, PRESETS[preset], work, work / "toy", gpu, skip_all, args.rehearsal_items)
    checks: list[Check] = []
    try:
        if not skip_all and 1 in parts:
            from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world

            make_toy_world(env.toy_dir, seed=0, sizes=SMALL_SIZES)
        jobs = plan(env, parts)
        for i, (check, fn) in enumerate(jobs, 1):
            checks.append(run_check(env, check, fn, i, len(jobs)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    counts = {
        "measured": sum(c.status == "measured" for c in checks),
        "failed": sum(c.failed for c in checks),
        "skipped": sum(c.status.startswith("skipped") for c in checks),
    }
    report = {
        "schema": 1,
        "created": created,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": device.type,
        "preset": preset,
        "gpu": gpu if cuda and gpu else NO_GPU,
        "gpu_figures_measured": bool(cuda and not skip_all and counts["measured"]),
        "versions": versions(),
        "faiss": faiss_gpu_status(),
        "sizes": asdict(env.sizes),
        "checks": [asdict(c) for c in checks],
        "counts": counts,
        "finished": counts["failed"] == 0,
        "total_seconds": time.perf_counter() - started,
        "work_dir": str(work) if args.keep else None,
    }
    print_table(env, checks, report)
    out = args.json or Path("outputs") / "gpu_check" / f"gpu_check_{device.type}_{created.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"JSON: {out}")
    return 1 if counts["failed"] else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def quiet() -> None:
    """Lightning's and saferclip's INFO lines and progress bars would bury the table."""
    import lightning  # noqa: F401  (it sets its loggers' levels on import: import it first)

    logging.getLogger().setLevel(logging.ERROR)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "saferclip", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


if __name__ == "__main__":
    sys.exit(main())

"""GPU readiness: every GPU path of saferclip run, checked and timed by one command.

    python scripts/gpu_check.py                         # a GPU if torch sees one, else the CPU form
    python scripts/gpu_check.py --quick                 # smaller sizes (the first minutes on a new GPU)
    python scripts/gpu_check.py --device cpu            # the reduced CPU form (what the tests run)
    python scripts/gpu_check.py --json $OUT/gpu_check.json --parts 1,3

On random-init models (nothing is downloaded), each part reusing the benchmark scripts:

  1  the training step in bf16 autocast: saferclip's Lightning step against a bare PyTorch
     step on the same encoders and batches (``bench_train_step.measure``); target
     lightning / bare <= 1.05; the peak GPU memory of each.
  2  the embedding-cache builder (image DataLoader workers) against the plain batched loop
     (``bench_embedding_cache.compare``); target plain / builder time >= 0.95.
  3  the exact neighbour search on the GPU (FAISS's GPU build when it loads, else torch
     matmul + topk on the GPU) against faiss-cpu at 1M x 768 (``bench_neighbours.mixture``):
     top-1 and top-k agreement, speed-up.
  4  ``saferclip-train trainer=gpu debug=fast_dev_run`` and ``trainer=ddp`` (world size =
     the visible GPUs) on the small toy world, each in its own process.
  5  the same short toy run in bf16-mixed and in fp32 ends at the same validation metrics
     (within a stated tolerance), and under bf16 autocast the encoders run in bf16 while
     every loss term is computed in float32.
  6  the real-size rehearsal (``saferclip-rehearse``): ViT-B/32 and ViT-L/14 (random init,
     224 px, the ``visu_vitl14`` preset's LoRA r16) on the rehearsal world (JPEG at 224 px
     in ViSU's layout) through cache, neighbours, training steps, evaluation and both
     exports: each stage's items/s and peak GPU memory. ``--rehearsal-items 165000`` runs it
     at ViSU's full size (rendering that world alone takes ~20 min of one CPU core).

On a CPU (no CUDA, or ``--device cpu``) the same checks run in a reduced form: the tiny
architectures (``saferclip-micro``, ``saferclip-toy``), small sizes, ``trainer=cpu`` and
``trainer=ddp_cpu`` (two gloo processes), bf16 autocast on the CPU; the table and the JSON then
say plainly that no GPU figure was measured. One table is printed and a JSON written
(device, GPU or "not measured: no GPU", versions, FAISS's GPU status, each check's figures
and status).

A check's status is ``passed``, ``failed: <why>`` or ``skipped: <why>`` (what cannot run
here: no CUDA, no bf16 on this GPU, out of GPU memory). Timing targets are figures to read,
marked met / missed, never a failure: the exit code is 0 when every check that ran passed,
1 when one failed.
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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# progress bars (the cache builder's) would bury the table; tqdm reads this when imported
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_embedding_cache  # noqa: E402
import bench_neighbours  # noqa: E402
import bench_train_step  # noqa: E402
import torch  # noqa: E402

# bench_neighbours picks faiss's BLAS kernels (prefer_fast_openblas) before faiss loads
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
# bf16 vs fp32 after the same short run: every validation metric (fractions of the 24 items
# of the small toy world: one item = 0.042), so 0.1 allows two items to flip on a near tie;
# the last training loss may differ by 5% (bf16 keeps 8 bits of mantissa in the encoders)
METRIC_TOLERANCE = 0.1
LOSS_TOLERANCE = 0.05


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
    app_workers: int
    run_batch: int
    run_epochs: int
    run_batches: float  # trainer.limit_train_batches of part 5 (1.0: every batch)
    rehearsal: tuple[tuple[str, int, int, int], ...] = ()  # (model override, items, steps, batch) of part 6


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
        app_workers=2,
        run_batch=16,
        run_epochs=3,
        run_batches=1.0,
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
        app_workers=2,
        run_batch=16,
        run_epochs=1,
        run_batches=1.0,
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
        app_workers=0,
        run_batch=16,
        run_epochs=1,
        run_batches=3,
        rehearsal=(("micro", 12, 1, 4),),
    ),
}


class Unavailable(Exception):
    """A check that cannot run here (reported as ``skipped: <message>``, not a failure)."""


@dataclass
class Check:
    part: int
    name: str
    status: str = "passed"
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
    rehearsal_items: int | None = None  # part 6 at this size instead of the preset's

    @property
    def cache_dir(self) -> Path:
        """Frozen-embedding caches of the small toy world, shared by parts 1, 4 and 5 (the
        key tells models apart)."""
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
    from saferclip.toyworld.generate import ensure_toy_world
    from saferclip.app.hydra_utils import to_container
    from saferclip.data.splits import load_split
    from saferclip.model.build import build_clip
    from saferclip.redirection.cache import build_or_load_cache

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
    cfg = bench_train_step.compose(
        model, "saferclip", env.toy_dir, env.cache_dir, s.train_batch, extra=("data.eval_batch_size=256",)
    )
    prebuild_cache(cfg, env.device)
    r = bench_train_step.measure(
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
    qset = bench_embedding_cache.toy_quadruplets(world, Mode.FULL, items)
    if len(qset) < items:
        raise RuntimeError(f"the toy world has {len(qset)} training items, {items} wanted")
    # warm-up (CUDA context, kernels, cuDNN's choice of algorithms) outside the timed runs
    embed_plain(bundle, bench_embedding_cache.toy_quadruplets(world, Mode.FULL, 16), 16)
    r = bench_embedding_cache.compare(
        f"{model} ({env.device.type})", bundle, qset, 256, s.cache_repeats, env.work / "cache" / model, s.cache_workers
    )
    check.figures = {"model": model, "arch": arch, **r}
    check.summary = (
        f"{r['inputs']} inputs: builder {r['cache_s']:.2f} s ({r['inputs_per_s']:.0f}/s, {r['num_workers']} workers), "
        f"plain {r['plain_s']:.2f} s, ratio {r['ratio']:.3f}, max |diff| {r['max_diff']:.1e}"
    )
    check.target = f">= {CACHE_TARGET}: {'met' if r['ratio'] >= CACHE_TARGET else 'missed'}"
    if r["max_diff"] > 1e-3:
        check.status = f"failed: the cache differs from the plain loop by {r['max_diff']:.1e}"
    del bundle
    free_gpu(env)


# ---------------------------------------------------------------- part 3: neighbour index


def check_neighbours(env: Env, check: Check) -> None:
    import numpy as np

    s = env.sizes
    faiss_status = faiss_gpu_status()
    pool = bench_neighbours.mixture(s.pool, s.dim, 200, 50, seed=0)
    queries = bench_neighbours.mixture(s.queries, s.dim, 200, 50, seed=1)
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
    # two exact searches may order (near) ties differently, float32 sums being taken in
    # another order, so they agree when their sorted similarities do; the ids are a figure
    if sim_diff > 1e-4:
        check.status = f"failed: exact searches disagree (max |sim diff| {sim_diff:.1e}, top-1 ids {100 * top1:.2f}%)"


# ---------------------------------------------------------------- part 4: the app


def train_command() -> list[str]:
    """The ``saferclip-train`` console script of this Python environment, else the module."""
    script = Path(sys.executable).parent / "saferclip-train"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "saferclip.app.train"]


def app_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "disabled")
    # the subprocesses import the saferclip this script runs from
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_app(env: Env, trainer: list[str], world_size: int, check: Check, timeout: float = 420) -> None:
    name = trainer[0].split("=", 1)[1]
    run_dir = env.work / "app" / name
    args = [
        *trainer,
        "debug=fast_dev_run",
        f"paths.toy_dir={env.toy_dir}",
        "data.toy_size=small",
        f"data.num_workers={env.sizes.app_workers}",
        f"paths.cache_dir={env.cache_dir}",
        f"paths.output_dir={env.work / 'app' / 'outputs'}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    command = train_command() + args
    check.figures = {"command": " ".join(["saferclip-train", *args]), "world_size": world_size}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=env.work, env=app_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        check.status = f"failed: did not finish in {timeout:.0f} s"
        return
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    results = [line for line in output.splitlines() if "saferclip.train][INFO] - result:" in line]
    check.figures.update({"exit_code": proc.returncode, "process_seconds": seconds, "results": len(results)})
    if proc.returncode != 0 or len(results) != world_size:
        tail = "\n".join(output.strip().splitlines()[-30:])
        check.error = tail
        check.status = (
            f"failed: exit code {proc.returncode}, {len(results)} of {world_size} process(es) reported a result"
        )
        return
    check.summary = f"fast_dev_run completed in {seconds:.1f} s, {world_size} process(es)"
    if name == "ddp" and world_size == 1:
        check.summary += "; world size 1 (one visible GPU): the cross-GPU gather did not run"


# ---------------------------------------------------------------- part 5: bf16 vs fp32


def compose_run(env: Env, precision: str, run_dir: Path):
    from hydra import compose, initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR

    overrides = [
        "model=toy",
        f"trainer={'gpu' if env.cuda else 'cpu'}",
        f"trainer.precision={precision}",
        "trainer.devices=1",
        f"trainer.max_epochs={env.sizes.run_epochs}",
        f"trainer.limit_train_batches={env.sizes.run_batches}",
        "trainer.enable_progress_bar=false",
        "callbacks.early_stopping=null",
        "method.curriculum=false",
        f"paths.toy_dir={env.toy_dir}",
        "data.toy_size=small",
        f"data.batch_size={env.sizes.run_batch}",
        "data.num_workers=0",
        f"paths.cache_dir={env.cache_dir}",
        f"paths.run_dir={run_dir}",
        f"paths.output_dir={run_dir.parent}",
        "logger=none",
        "export=false",
        "seed=0",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def loss_dtypes(env: Env, cfg) -> dict[str, Any]:
    """Under bf16 autocast: the dtype the encoders' projections return (before the L2
    normalisation, which autocast runs in float32 on CUDA but not on the CPU) and the dtype
    of each loss term; and the loss with and without autocast."""
    from saferclip.model.build import encode_tokens

    module, batches = bench_train_step.prepare(cfg, 1)
    module.to(env.device)
    batch = bench_train_step.to_device(batches[0], env.device)
    with torch.no_grad(), torch.autocast(device_type=env.device.type, dtype=torch.bfloat16):
        features = [
            module.model.encode_image(batch["safe_image"], normalize=False),
            encode_tokens(module.model, batch["safe_text"], normalize=False),
        ]
        total, terms = module.loss_step(batch)
    with torch.no_grad():
        fp32_total, _ = module.loss_step(batch)
    return {
        "features": sorted({str(v.dtype).replace("torch.", "") for v in features}),
        "total": str(total.dtype).replace("torch.", ""),
        "terms": {k: str(v.dtype).replace("torch.", "") for k, v in terms.items()},
        "loss_bf16_autocast": float(total),
        "loss_fp32": float(fp32_total),
    }


def check_precision(env: Env, check: Check) -> None:
    env.need_bf16()
    from saferclip.app.train import train

    work = env.work / "precision"
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = compose_run(env, precision, work / precision)
        results[precision] = {k: v for k, v in train(cfg).items() if isinstance(v, float)}
    dtypes = loss_dtypes(env, compose_run(env, "bf16-mixed", work / "dtypes"))
    fp32, bf16 = results["32-true"], results["bf16-mixed"]
    compared = sorted(k for k in fp32.keys() & bf16.keys() if k.startswith("val/"))
    if not compared or "train/loss" not in fp32.keys() & bf16.keys():
        raise RuntimeError(f"the runs logged no validation metrics or training loss ({sorted(fp32)})")
    deltas = {k: abs(bf16[k] - fp32[k]) for k in compared}
    loss_rel = abs(bf16["train/loss"] - fp32["train/loss"]) / max(abs(fp32["train/loss"]), 1e-12)
    check.figures = {
        "fp32": fp32,
        "bf16": bf16,
        "metric_deltas": deltas,
        "metric_tolerance": METRIC_TOLERANCE,
        "train_loss_relative_delta": loss_rel,
        "loss_tolerance": LOSS_TOLERANCE,
        "dtypes_under_bf16_autocast": dtypes,
        "epochs": env.sizes.run_epochs,
        "limit_train_batches": env.sizes.run_batches,
        "batch": env.sizes.run_batch,
    }
    worst = max(deltas, key=deltas.get)
    agreement = (
        f"all {len(deltas)} val metrics equal"
        if deltas[worst] == 0
        else f"max |delta| over {len(deltas)} val metrics {deltas[worst]:.3f} ({worst}, tol {METRIC_TOLERANCE})"
    )
    check.summary = (
        f"{agreement}, "
        f"train loss {fp32['train/loss']:.4f} vs {bf16['train/loss']:.4f} ({100 * loss_rel:.1f}%, tol "
        f"{100 * LOSS_TOLERANCE:.0f}%); under autocast: encoders {'/'.join(dtypes['features'])}, "
        f"loss terms {'/'.join(sorted(set(dtypes['terms'].values())))}"
    )
    problems = []
    if deltas[worst] > METRIC_TOLERANCE:
        problems.append(f"{worst} differs by {deltas[worst]:.3f}")
    if loss_rel > LOSS_TOLERANCE:
        problems.append(f"the training loss differs by {100 * loss_rel:.1f}%")
    if dtypes["features"] != ["bfloat16"]:
        problems.append(f"the encoders returned {dtypes['features']} under bf16 autocast")
    not_fp32 = [k for k, v in dtypes["terms"].items() if v != "float32"] + (
        [] if dtypes["total"] == "float32" else ["total"]
    )
    if not_fp32:
        problems.append(f"loss terms not in float32: {', '.join(not_fp32)}")
    if problems:
        check.status = "failed: " + "; ".join(problems)


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


def check_rehearsal(env: Env, model: str, items: int, steps: int, batch: int, check: Check) -> None:
    from saferclip.app.rehearse import rehearse

    workers = env.sizes.cache_workers if env.cuda else 0
    rows = rehearse(env.work / "rehearsal" / model, [f"model={model}"], items, steps, env.device.type, batch, workers)
    check.figures = {"model": model, "items": items, "steps": steps, "batch": batch, "stages": rows}
    check.summary = ", ".join(f"{r['stage']} {r['items_per_s']:.1f}/s {r['peak_gb']:.1f} GB" for r in rows)
    free_gpu(env)


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
        if env.cuda:
            world = env.gpu["count"] if env.gpu else 1
            runs = [(["trainer=gpu"], 1), (["trainer=ddp", f"trainer.devices={world}"], world)]
        else:
            runs = [(["trainer=cpu"], 1), (["trainer=ddp_cpu"], 2)]
        for trainer, world in runs:
            c = Check(4, f"saferclip-train {' '.join(trainer)} debug=fast_dev_run")

            def job(c=c, t=trainer, w=world) -> None:
                if env.cuda and t[0] == "trainer=gpu":
                    env.need_bf16()
                check_app(env, t, w, c)

            jobs.append((c, job))
    if 5 in parts:
        c = Check(5, f"toy run bf16-mixed vs fp32, {s.run_epochs} epoch(s)")
        jobs.append((c, lambda c=c: check_precision(env, c)))
    if 6 in parts:
        for model, items, steps, batch in s.rehearsal:
            items = env.rehearsal_items or items
            c = Check(6, f"rehearsal {model}, {items} quadruplets, {steps} steps of {batch}")
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
    print(f"saferclip GPU check, {report['created']}, device {env.device.type}, preset {report['preset']}")
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
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"{report['total_seconds']:.0f} s in all"
    )
    if env.skip_all:
        print(f"GPU figures: not measured: {env.skip_all}.")
    elif not env.cuda:
        print("GPU figures: not measured (no GPU here): this was the reduced CPU form of every check.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smaller GPU sizes (the CPU form is always small)")
    p.add_argument("--parts", default="1,2,3,4,5,6", help="which checks, comma-separated (default all)")
    p.add_argument("--rehearsal-items", type=int, default=None, help="part 6's training quadruplets (165000: ViSU's size)")
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
        p.error(f"--parts: comma-separated numbers from 1 to 6, got {args.parts!r}")
    if not parts <= {1, 2, 3, 4, 5, 6}:
        p.error(f"--parts: checks are numbered 1 to 6, got {args.parts!r}")

    started = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    quiet()
    gpu = gpu_info()
    skip_all = None
    if args.device == "cuda" and gpu is None:
        skip_all = f"--device cuda, but torch {torch.__version__} sees no CUDA device"
    # --device cuda without CUDA: the GPU checks are listed, each skipped, none run
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
        if not skip_all and (parts & {1, 4, 5}):
            from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world

            make_toy_world(env.toy_dir, seed=0, sizes=SMALL_SIZES)
        jobs = plan(env, parts)
        for i, (check, fn) in enumerate(jobs, 1):
            checks.append(run_check(env, check, fn, i, len(jobs)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    counts = {
        "passed": sum(c.status == "passed" for c in checks),
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
        "gpu_figures_measured": bool(cuda and not skip_all and counts["passed"]),
        "versions": versions(),
        "faiss": faiss_gpu_status(),
        "sizes": asdict(env.sizes),
        "checks": [asdict(c) for c in checks],
        "counts": counts,
        "passed": counts["failed"] == 0,
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

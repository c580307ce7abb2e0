"""Benchmark one training step: saferclip's Lightning step against a bare PyTorch loop.

The variants (``lightning``, ``bare``, ``bare+frozen``: the public Safe-CLIP reference, which
runs the frozen encoders every step) and how each is timed are described in
:mod:`saferclip.benchmarks.train_step`, which measures them; this script prints the table.
Target: lightning / bare <= 1.05, and saferclip (lightning) faster than bare+frozen.
``--accelerator gpu --precision bf16-mixed`` runs the same comparison on a GPU in bf16
autocast (the bare step under ``torch.autocast`` too) and reports each variant's peak GPU
memory; ``scripts/gpu_check.py`` runs it that way. Each figure is the median over the timed
steps after warm-up.

    python scripts/bench_train_step.py                              # toy + ViT-B-32 (random init)
    python scripts/bench_train_step.py --models toy --steps 20      # quicker, more steps
    python scripts/bench_train_step.py --method safeclip            # the baseline's terms
    python scripts/bench_train_step.py --models vit-b-32,vit-l-14 --accelerator gpu --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from saferclip.benchmarks.train_step import DEFAULT_STEPS, MODELS, PRECISIONS, VARIANT_LABELS, LossMismatch, compose, measure


def bench_model(name: str, args, toy_dir: Path, work: Path) -> tuple[list[tuple], dict]:
    cfg = compose(name, args.method, toy_dir, work / "cache", args.batch_size)
    result = measure(
        cfg,
        work,
        batches=args.batches,
        steps=args.steps or DEFAULT_STEPS[name],
        warmup=args.warmup,
        accelerator=args.accelerator,
        precision=args.precision,
        progress_bar=args.progress_bar,
    )
    rows = []
    for variant, label in VARIANT_LABELS.items():
        peak = result["peak_memory_bytes"][variant]
        rows.append(
            (
                name,
                label,
                result["median_s"][variant],
                result["min_s"][variant],
                result["ratio_median"][variant],
                result["ratio_min"][variant],
                peak,
            )
        )
    frozen_speedup = result["median_s"]["bare+frozen"] / result["median_s"]["lightning"]
    return rows, {"steps": result["steps"], "frozen_speedup": frozen_speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy,vit-b-32", help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--method", default="saferclip", choices=["saferclip", "safeclip"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant (default: 20 toy, 5 ViT-B-32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    parser.add_argument("--toy-dir", type=Path, default=None, help="a small toy world (default: a temporary one)")
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("lightning.pytorch", "lightning.fabric", "saferclip"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows, notes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        work = Path(tmp)
        toy_dir = args.toy_dir or work / "toy"
        for name in args.models.split(","):
            try:
                model_rows, notes[name.strip()] = bench_model(name.strip(), args, toy_dir, work / name)
            except LossMismatch as e:
                raise SystemExit(str(e)) from None
            rows += model_rows
    print(
        f"\ntraining step, method={args.method}, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.accelerator} {args.precision}, {args.warmup} warm-up steps, variants interleaved step by step"
    )
    gpu = args.accelerator == "gpu"
    print(
        f"{'model':<9} {'variant':<25} {'median ms':>10} {'min ms':>8} {'/bare (median)':>15} {'/bare (min)':>12}"
        + (f" {'peak GiB':>9}" if gpu else "")
    )
    for model, variant, median, low, ratio, ratio_low, peak in rows:
        line = f"{model:<9} {variant:<25} {median * 1000:>10.1f} {low * 1000:>8.1f} {ratio:>15.3f} {ratio_low:>12.3f}"
        print(line + (f" {peak / 2**30:>9.2f}" if gpu else ""))
    for model, note in notes.items():
        print(
            f"{model}: {note['steps']} timed steps per variant; the reference-style step (frozen encoders run "
            f"every step) takes {note['frozen_speedup']:.2f}x the time of saferclip's Lightning step"
        )


if __name__ == "__main__":
    main()

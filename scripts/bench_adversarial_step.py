"""Benchmark adversarial safety fine-tuning: a training step with ``method.adversarial.enabled``
against a clean one, per method, on the same weights and batches (what each step holds:
:mod:`saferclip.benchmarks.adversarial_step`). Target: adversarial / clean <= 3.

    python scripts/bench_adversarial_step.py                             # toy model, the three methods
    python scripts/bench_adversarial_step.py --methods saferclip --steps 20
    python scripts/bench_adversarial_step.py --set method.adversarial.steps=2 --set method.adversarial.preserve_safe=true
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from saferclip.benchmarks.adversarial_step import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="safeclip,saferclip,hysac")
    parser.add_argument("--model", default="toy", choices=["micro", "toy", "vit-b-32"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--toy-dir", type=Path, default=None, help="an existing small toy world (default: made in a temporary folder)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a training-config override for both variants, e.g. method.adversarial.steps=2",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toy_dir = args.toy_dir or Path(tmp) / "world"
        for method in args.methods.split(","):
            rows.append(
                measure(
                    method, args.model, toy_dir, Path(tmp) / method, args.batch_size, args.steps, extra=tuple(args.set)
                )
            )
    print(
        f"model {args.model}, batch {args.batch_size}, {args.steps} timed steps, {args.threads} thread(s), overrides {args.set or 'none'}"
    )
    print("| method | clean step (ms) | adversarial step (ms) | adversarial / clean | of which attacks |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {1000 * r['median_s']['clean']:.1f} | {1000 * r['median_s']['adversarial']:.1f} | "
            f"{r['ratio']:.2f}x | {100 * r['attack_share']:.0f}% |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of the frozen-embedding cache builder against a plain batched open_clip loop.

Both embed the same quadruplets with the same model and batch size: the plain loop is
``saferclip.redirection.cache.embed_plain`` (tokenize / preprocess, encode, concatenate; no
fingerprints, no files, no checks); the builder adds the model and data fingerprints, the
NaN check, the DataLoader and the atomic ``.npy`` writes. The ratio printed is
plain time / builder time (1.0 = no overhead; target >= 0.95).

Cases: the toy world (``make_toy_world``) with ``saferclip-toy`` (the shipped base weights if
present, else random init), captions and both images; and ViT-B-32 (random init: nothing is
downloaded) on a few hundred toy captions, text only.

    python scripts/bench_embedding_cache.py
    python scripts/bench_embedding_cache.py --toy-items 500 --vit-items 64 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from saferclip.benchmarks.embedding_cache import HEADER, compare, toy_quadruplets
from saferclip.data.records import Mode
from saferclip.model.build import build_clip, default_base_checkpoint
from saferclip.toyworld.generate import ToySizes, make_toy_world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-root", default=os.path.join(tempfile.gettempdir(), "saferclip_bench_toy"))
    p.add_argument("--toy-items", type=int, default=2000)
    p.add_argument("--vit-items", type=int, default=128, help="quadruplets for ViT-B-32 (2 captions each); 0 skips it")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workers", type=int, default=0, help="the builder's image DataLoader workers")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warnings
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sizes = ToySizes(
        train=args.toy_items, validation=8, test=8, nsfw_caps=8, zeroshot_per_class=1, scene_per_class=1, distractors=8
    )
    world = make_toy_world(args.toy_root, seed=0, sizes=sizes, force=True)
    base = default_base_checkpoint()
    toy = build_clip("saferclip-toy", base if base.is_file() else None)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, best of {args.repeats}; "
        f"saferclip-toy weights: {toy.source}"
    )
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        compare(
            "toy, captions + images",
            toy,
            toy_quadruplets(world, Mode.FULL, args.toy_items),
            args.batch_size,
            args.repeats,
            Path(tmp),
            args.workers,
        )
        if args.vit_items:
            vit = build_clip("ViT-B-32")
            qset = toy_quadruplets(world, Mode.TEXT, args.vit_items)
            compare("ViT-B-32 (random), captions", vit, qset, args.batch_size, args.repeats, Path(tmp), args.workers)
    print(
        "ratio = plain wall time / cache-builder wall time, best of each (the builder's throughput relative to the "
        "plain loop; target >= 0.95); cpu rat = the same with process CPU time"
    )


if __name__ == "__main__":
    main()

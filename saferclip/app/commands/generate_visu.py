"""saferclip-generate-visu: regenerate ViSU's withheld unsafe images from its unsafe captions.

    # one GPU; the published protocol's seeds; a CLIP zero-shot NSFW scorer (ViT-L-14 openai)
    saferclip-generate-visu visu_text/train.csv out/visu-train --pipeline runwayml/stable-diffusion-v1-5 \\
        --device cuda --dtype fp16
    # four GPUs: one process each (or torchrun / accelerate launch with --shard auto)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i saferclip-generate-visu ... --shard $i/4 & done
    # your own NSFW detector: a module with a factory returning images -> scores in [0, 1]
    saferclip-generate-visu ... --scorer my_detector:make_scorer

Killed runs resume where they stopped (run the same command again); the last shard to finish
writes ``OUT_DIR/<input stem>.json``, a ViSU JSON with ``nsfw_im_path`` relative to OUT_DIR
(``--merge-only`` writes it again, or a partial one with ``--allow-partial``). The library is
:mod:`saferclip.downstream.visu_generation`. A plain argparse CLI; what the user can fix is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli import argparse_epilog

PROG = "saferclip-generate-visu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate, for each unsafe caption of a ViSU(-Text) split, images at fixed seeds with a "
        "diffusion pipeline and keep the first one an NSFW scorer flags; resumable and shardable.",
    )
    p.add_argument(
        "input", type=Path, help="a ViSU JSON, a ViSU-Text table (.csv/.jsonl/.parquet) or a HF datasets folder"
    )
    p.add_argument("out_dir", type=Path, help="the output folder (shared by all shards and resumed runs)")
    p.add_argument("--split", default=None, help="the split of a HF datasets folder")
    p.add_argument(
        "--pipeline",
        default="runwayml/stable-diffusion-v1-5",
        help="diffusers text-to-image pipeline: hub id or local folder",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds tried in order (default: the published protocol's)"
    )
    p.add_argument(
        "--seed-per-caption",
        action="store_true",
        help="derive each image's seed from (caption id, seed) instead of using the seeds as is",
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, help="an image is kept when its NSFW score is >= this (default 0.5)"
    )
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (cuda:<LOCAL_RANK> when there is a GPU)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="pipeline dtype (fp16 on a GPU)")
    p.add_argument(
        "--shard", default="0/1", help="i/n: this process takes items i, i+n, ...; auto: from RANK/WORLD_SIZE or SLURM"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many captions in this run (a trial)")
    p.add_argument(
        "--scorer", default="clip", help="clip (zero-shot CLIP NSFW classifier) or module:factory (your own)"
    )
    p.add_argument("--scorer-arch", default="ViT-L-14", help="open_clip architecture of the clip scorer")
    p.add_argument(
        "--scorer-pretrained",
        default="openai",
        help="its weights: open_clip tag, file or folder; 'none' for random (tests)",
    )
    p.add_argument(
        "--unsafe-prompts", type=Path, default=None, help="a text file, one unsafe-class prompt a line (clip scorer)"
    )
    p.add_argument(
        "--safe-prompts", type=Path, default=None, help="a text file, one safe-class prompt a line (clip scorer)"
    )
    p.add_argument("--merge-only", action="store_true", help="only (re)write the merged ViSU JSON from the records")
    p.add_argument(
        "--allow-partial", action="store_true", help="with --merge-only: merge even while captions lack a record"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prompts(path: Path | None, default: tuple[str, ...]) -> list[str]:
    if path is None:
        return list(default)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts (one a line)")
    return lines


def _device(spec: str) -> str:
    import os

    import torch

    if spec != "auto":
        return spec
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def _scorer(args: argparse.Namespace, device: str):
    from ...downstream import nsfw_scorer

    if args.scorer != "clip":
        return nsfw_scorer.load_scorer(args.scorer), {"kind": "plugin", "factory": args.scorer}
    from ...model.build import build_clip

    pretrained = None if args.scorer_pretrained.lower() in ("none", "random", "") else args.scorer_pretrained
    bundle = build_clip(args.scorer_arch, pretrained, device=device)
    scorer = nsfw_scorer.ClipNsfwScorer(
        bundle,
        _prompts(args.unsafe_prompts, nsfw_scorer.DEFAULT_UNSAFE_PROMPTS),
        _prompts(args.safe_prompts, nsfw_scorer.DEFAULT_SAFE_PROMPTS),
    )
    return scorer, scorer.describe()


def check_args(args: argparse.Namespace) -> None:
    """The arguments a typo or a sign error would break only once the pipeline runs: one line
    naming the argument, the value and what was expected."""
    import math

    def bad(flag: str, value, expected: str) -> ValueError:
        return ValueError(f"{flag} {value}: expected {expected}")

    if args.limit is not None and args.limit < 1:
        raise bad("--limit", args.limit, "a number of captions >= 1 (leave it out for all)")
    if args.steps < 1:
        raise bad("--steps", args.steps, "a number of denoising steps >= 1")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value < 8 or value % 8:
            raise bad(flag, value, "a multiple of 8 pixels (the pipeline's VAE needs it), e.g. 512")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise bad("--guidance", args.guidance, "a finite guidance scale >= 0, e.g. 7.5")
    if not (math.isfinite(args.threshold) and 0.0 <= args.threshold <= 1.0):
        raise bad("--threshold", args.threshold, "an NSFW score in [0, 1]")
    if args.seeds is None:  # read here, not in the parser: --help imports no torch
        from ...downstream.generation_settings import PUBLISHED_SEEDS

        args.seeds = list(PUBLISHED_SEEDS)
    bad_seeds = [s for s in args.seeds if s < 0]
    if bad_seeds or len(set(args.seeds)) != len(args.seeds):
        raise bad("--seeds", " ".join(map(str, args.seeds)), "distinct integers >= 0")
    check_pipeline_name(str(args.pipeline))


def check_pipeline_name(name: str) -> None:
    """A local folder that does not exist is named as such, not tried on the hub (whose error
    would be a connection failure): anything but a hub id ``org/name`` is a path."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"--pipeline {name}: a file, expected a diffusers pipeline folder or a hub id (org/name)"
            )
        return
    parts = name.split("/")
    looks_local = (
        name.startswith(("/", ".", "~")) or "\\" in name or len(parts) > 2 or any(p in ("", ".", "..") for p in parts)
    )
    if looks_local:
        raise FileNotFoundError(
            f"--pipeline {name}: no such folder (expected a diffusers pipeline folder or a hub id like org/name)"
        )


def run(args: argparse.Namespace) -> str:
    from ...downstream import visu_generation as vg
    from ...downstream.generation_settings import GenerationConfig
    from ...downstream.image_generator import DiffusersImageGenerator, load_diffusion_pipeline
    from ...export.public_names import public_model_name

    if not args.merge_only:
        check_args(args)
    split = vg.load_captions(args.input, args.split)
    if args.merge_only:
        path = vg.merge_generation(split, args.out_dir, allow_partial=args.allow_partial)
        return f"wrote {path}"
    config = GenerationConfig(
        seeds=tuple(args.seeds),
        threshold=args.threshold,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        seed_per_caption=args.seed_per_caption,
    )
    shard = vg.parse_shard(args.shard)
    device = _device(args.device)
    scorer, scorer_info = _scorer(args, device)

    def factory():
        return DiffusersImageGenerator(
            load_diffusion_pipeline(str(args.pipeline), device=device, dtype=args.dtype), config
        )

    settings = {"pipeline": public_model_name(str(args.pipeline)), "dtype": args.dtype, "scorer": scorer_info}
    report = vg.generate_visu_images(
        split,
        args.out_dir,
        factory,
        scorer,
        config,
        shard=shard,
        limit=args.limit,
        settings=settings,
        progress=not args.no_progress,
    )
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("saferclip").setLevel(logging.WARNING)
    try:
        print(run(args))
    except ImportError as e:
        print(f"{PROG}: error: {e}; install it with: pip install 'saferclip[downstream]'", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # DataFormatError and CheckpointError are ValueErrors
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

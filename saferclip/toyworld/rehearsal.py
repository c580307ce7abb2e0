"""The toy world at real size, in ViSU's real layout: the rehearsal world of ``saferclip-rehearse``.

The toy generator's ViSU splits, rendered at ``size`` px and saved as JPEG where the real data
lives: ``<root>/visu/{train,validation,test}.json`` (ViSU's JSON: ``coco_id``,
``nsfw_im_path``, ``safe``, ``nsfw``, ``tag``), the safe images as COCO files
``<root>/coco/{train2017,val2017}/<coco_id:012d>.jpg`` (validation and test both in val2017,
as in ViSU), and the unsafe images under ``<root>/visu_images/nsfw/<split>/<n>.jpg``. So the
``visu`` data config reads it unchanged: ``paths.visu=<root>/visu paths.coco=<root>/coco
paths.visu_images=<root>/visu_images``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..files import atomic_folder
from .generate import _write_visu_split
from .pairing import DEFAULT_PAIRING, PAIRINGS

SPLIT_DIRS = {"train": "train2017", "validation": "val2017", "test": "val2017"}
OFFSETS = {"train": 1, "validation": 1_000_000, "test": 2_000_000}


def _to_jpeg(src: Path, dst: Path, size: int, quality: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, format="JPEG", quality=quality)


def make_rehearsal_world(
    root: str | os.PathLike,
    train: int = 1000,
    validation: int = 200,
    test: int = 200,
    size: int = 224,
    seed: int = 0,
    quality: int = 90,
    force: bool = False,
) -> Path:
    """Write the rehearsal world (see the module docstring) under ``root``; reused when the same
    sizes and seed are already there; atomic."""
    if min(train, validation, test) < 1 or size < 32:
        raise ConfigError(
            f"rehearsal world: splits need >= 1 item and size >= 32, got {train}/{validation}/{test}, {size}"
        )
    root = Path(root)
    manifest = {
        "rehearsal_world": 2,
        "pairing": DEFAULT_PAIRING,
        "seed": seed,
        "sizes": [train, validation, test],
        "size": size,
        "quality": quality,
    }
    if (root / "manifest.json").is_file() and json.loads((root / "manifest.json").read_text()) == manifest:
        return root
    with atomic_folder(root, replace=force) as out, tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
        for rng, (split, n) in zip(rngs, (("train", train), ("validation", validation), ("test", test))):
            records = _write_visu_split(Path(scratch), split, n, rng, OFFSETS[split], PAIRINGS[DEFAULT_PAIRING])
            small = Path(scratch) / "visu"
            for r in records:
                coco = out / "coco" / SPLIT_DIRS[split] / f"{r['coco_id']:012d}.jpg"
                if not coco.exists():
                    src = next(
                        small / d / f"{r['coco_id']:012d}.png"
                        for d in ("train2017", "val2017", "test2017")
                        if (small / d / f"{r['coco_id']:012d}.png").exists()
                    )
                    _to_jpeg(src, coco, size, quality)
                nsfw = r["nsfw_im_path"].replace(".png", ".jpg")
                _to_jpeg(small / r["nsfw_im_path"], out / "visu_images" / nsfw, size, quality)
                r["nsfw_im_path"] = nsfw
            payload = {
                "info": {"description": "saferclip rehearsal world (toy scenes at real size)"},
                "data": {str(i): r for i, r in enumerate(records)},
            }
            (out / "visu").mkdir(exist_ok=True)
            (out / "visu" / f"{split}.json").write_text(json.dumps(payload) + "\n")
            shutil.rmtree(small, ignore_errors=True)
        (out / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return root

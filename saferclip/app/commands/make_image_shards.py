"""saferclip-make-image-shards: decode and resize the training and validation images once, into
uint8 memory maps that the training loader reads instead of the JPEGs (saferclip/data/image_shards.py).

    saferclip-make-image-shards experiment=visu_vitl14 paths.visu=/data/visu paths.coco=/data/coco

Same config tree as `saferclip-train` (conf/train.yaml); writes `<data.image_shards>/<split>/`
(the `visu_vitl14` preset reads them from there when they exist). Add `force=true` to replace
shards that exist.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ..cli import hydra_command
from ..hydra_utils import ConfigError, check_train_config, to_container

log = logging.getLogger("saferclip.image_shards")


def make_shards(cfg: DictConfig) -> dict[str, dict]:
    """Write each split's shards; returns ``{split: {"images": n, "seconds": s, "folder": path}}``."""
    from ...data.image_shards import write_image_shards
    from ...data.splits import load_split
    from ...model.build import build_clip
    from ...toyworld.generate import ensure_toy_world

    check_train_config(cfg)
    data = to_container(cfg.data)
    if not data.get("image_shards"):
        raise ConfigError("data.image_shards is not set: the folder to write the shards to")
    ensure_toy_world(data)
    preprocess = build_clip(cfg.model.arch, None).preprocess  # the architecture's preprocessing only
    out = {}
    for split in ("train", "validation"):
        qset = load_split(data, split)
        paths = [p for q in qset.items for p in (q.safe_image, q.unsafe_image) if p is not None]
        if not paths:
            log.info("%s: no images (text-only data), nothing to write", split)
            continue
        start = time.perf_counter()
        folder = write_image_shards(
            paths, Path(data["image_shards"]) / split, preprocess, force=bool(cfg.get("force", False))
        )
        out[split] = {
            "images": len(set(paths)),
            "seconds": round(time.perf_counter() - start, 2),
            "folder": str(folder),
        }
    return out


def _task(cfg: DictConfig) -> None:
    for split, info in make_shards(cfg).items():
        print(f"{split}: {info['images']} images in {info['folder']} ({info['seconds']:.1f} s)")


OPTIONS = {
    "experiment=NAME": "the recipe whose data is sharded, e.g. visu_vitl14",
    "paths.visu=DIR paths.coco=DIR": "where ViSU's captions and COCO's images are",
    "data.image_shards=DIR": "where the shards go (the preset's default: beside the data)",
    "force=true": "replace shards that exist",
}
main = hydra_command("saferclip-make-image-shards", "train", _task, __doc__, OPTIONS)


if __name__ == "__main__":
    main()

"""Images decoded and resized once, read back as a uint8 memory map: the input pipeline that can feed a GPU.

Decoding a COCO JPEG and resizing it to 224 px costs milliseconds of CPU per image, every
epoch; a ViT-L/14 step on a GPU consumes hundreds of images per second. :func:`write_image_shards`
runs the PIL part of the model's preprocessing (resize, centre crop, RGB: everything before
``ToTensor``) once and stores the result as ``images.npy`` ``uint8 [N, H, W, 3]``;
:class:`ImageShards` then serves an image as ``ToTensor`` + ``Normalize`` of its row, which is
*exactly* what the full preprocessing gives (the PIL part's output is uint8 either way).

Layout of a shard folder: ``images.npy`` and ``images.json`` (the preprocessing it was written
with, every source file's path, size and modification time, and the checksum of
``images.npy``). A source file changed since, or another preprocessing, makes
:meth:`ImageShards.open` refuse the folder (None, with a one-line reason): the caller reads the
JPEGs instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision import transforms

from ..errors import ConfigError
from ..files import atomic_folder
from ..integrity import DamagedArtefact, digests, verify_all
from .images import load_image

log = logging.getLogger(__name__)

SHARDS_FORMAT_VERSION = 1


def split_preprocess(preprocess: Callable) -> tuple[transforms.Compose, transforms.Compose]:
    """``(PIL part, tensor part)`` of a torchvision ``Compose``, split before its ``ToTensor``."""
    steps = list(getattr(preprocess, "transforms", []))
    at = next((i for i, t in enumerate(steps) if isinstance(t, transforms.ToTensor)), None)
    if at is None:
        raise ConfigError(f"the image preprocessing has no ToTensor step to split at: {preprocess!r}")
    return transforms.Compose(steps[:at]), transforms.Compose(steps[at:])


def _describe(part: transforms.Compose) -> str:
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(part))


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def write_image_shards(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, preprocess: Callable, force: bool = False
) -> Path:
    """Decode and resize every image of ``paths`` once (the PIL part of ``preprocess``) into
    ``out/images.npy`` ``uint8 [N, H, W, 3]`` + ``out/images.json``; atomic; duplicates stored once."""
    pil_part, _ = split_preprocess(preprocess)
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    if not unique:
        raise ConfigError("no image to write into shards")
    first = np.asarray(pil_part(load_image(unique[0])))
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise ConfigError(f"the preprocessing's PIL part gives {first.dtype} {first.shape}, expected uint8 [H, W, 3]")
    with atomic_folder(out, replace=force) as tmp:
        arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(unique), *first.shape))
        for i, path in enumerate(unique):
            image = np.asarray(pil_part(load_image(path)))
            if image.shape != first.shape:
                raise ConfigError(f"{path}: preprocessed to {image.shape}, the others to {first.shape} (no centre crop?)")
            arr[i] = image
        arr.flush()
        del arr
        info = {
            "format_version": SHARDS_FORMAT_VERSION,
            "preprocess": _describe(pil_part),
            "shape": [len(unique), *first.shape],
            "files": [[str(p), *_stat(p)] for p in unique],
            "checksums": digests(tmp, ["images.npy"]),
        }
        (tmp / "images.json").write_text(json.dumps(info) + "\n")
    return Path(out)


class ImageShards:
    """Preprocessed images served from a shard folder: ``shards.image(path)`` -> ``[3, H, W]`` float."""

    def __init__(self, folder: Path, images: np.ndarray, rows: dict[Path, int], tensor_part: Callable):
        self.folder, self.images, self.rows, self.tensor_part = folder, images, rows, tensor_part

    @classmethod
    def open(cls, folder: str | os.PathLike, preprocess: Callable, check_files: bool = True) -> "ImageShards | None":
        """The shards in ``folder`` if they were written with this preprocessing from the files
        as they are now (size + mtime, ``check_files``); else None, with a one-line warning."""
        folder = Path(folder)
        try:
            info = json.loads((folder / "images.json").read_text())
            if info.get("format_version") != SHARDS_FORMAT_VERSION:
                raise DamagedArtefact(folder / "images.json", f"format {info.get('format_version')!r}")
            pil_part, tensor_part = split_preprocess(preprocess)
            if info["preprocess"] != _describe(pil_part):
                raise ValueError(f"{folder}: written with another preprocessing")
            verify_all(folder, info["checksums"], "image shards")
            images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
            if list(images.shape) != info["shape"] or images.dtype != np.uint8:
                raise DamagedArtefact(folder / "images.npy", f"{images.dtype} {images.shape}, images.json says {info['shape']}")
            rows = {}
            for i, (name, size, mtime) in enumerate(info["files"]):
                path = Path(name)
                if check_files and _stat(path) != [size, mtime]:
                    raise ValueError(f"{path}: changed since the shards in {folder} were written")
                rows[path] = i
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s; reading the image files instead of the shards", " ".join(str(e).split()))
            return None
        return cls(folder, images, rows, tensor_part)

    def __contains__(self, path: str | os.PathLike) -> bool:
        return Path(path).resolve() in self.rows

    def image(self, path: str | os.PathLike) -> torch.Tensor:
        """``preprocess(load_image(path))``, from the shard's row (KeyError when it holds no such file)."""
        return self.tensor_part(np.array(self.images[self.rows[Path(path).resolve()]]))

"""A split as the data config names it (``conf/data/*.yaml``: ``splits.<name>``), loaded in one place.

Training, the dry run, ``saferclip-index`` and the evaluation all read a split through
:func:`load_split`; the keys of a split spec are ``path`` plus the loader options of
:func:`saferclip.data.load_quadruplets` (``image_root``, ``split_dir``, ``unsafe_image_root``,
``image_ext``, ``verify_images``), and ``distractor_images``: a folder of extra *safe* images
that realistic retrieval galleries add (real indexes hold far more safe images than unsafe
ones, and safe scenes of every kind), read by :func:`distractor_images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .records import DataFormatError, QuadrupletSet
from .tables import load_quadruplets

GALLERY_KEYS = ("distractor_images",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def split_spec(data_cfg: Mapping[str, Any], split: str) -> dict[str, Any]:
    splits = data_cfg.get("splits") or {}
    if split not in splits:
        raise DataFormatError("data config", f"no split {split!r} (has: {', '.join(splits) or 'none'})", field=f"splits.{split}")
    return dict(splits[split])


def load_split(data_cfg: Mapping[str, Any], split: str, **options: Any) -> QuadrupletSet:
    """The quadruplets of ``data_cfg.splits[split]`` (mode and ``on_error`` from the data config)."""
    spec = {k: v for k, v in split_spec(data_cfg, split).items() if k not in GALLERY_KEYS}
    path = spec.pop("path")
    spec.update(options)
    return load_quadruplets(path, mode=data_cfg.get("mode", "auto"), on_error=data_cfg.get("on_error", "raise"), **spec)


def distractor_images(data_cfg: Mapping[str, Any], split: str) -> list[Path] | None:
    """The image files of the split's ``distractor_images`` folder, sorted (None when not set)."""
    folder = split_spec(data_cfg, split).get("distractor_images")
    if folder in (None, "", "None", "null"):
        return None
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataFormatError(folder, "distractor_images: not a folder of images", field=f"splits.{split}.distractor_images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataFormatError(folder, f"distractor_images: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files

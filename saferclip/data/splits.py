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


DATA_MODES = ("auto", "text", "safe_images", "full")
ON_ERROR = ("raise", "skip")


def check_data_config(data_cfg: Mapping[str, Any], splits: tuple[str, ...] = ("train", "validation")) -> None:
    """Refuse a data config that cannot work, naming the key: batch sizes, workers, the
    mode, ``on_error``, and the ``splits`` a command needs (each with a ``path``). Paths that
    exist and files that parse are checked by loading them (``dry_run=true``)."""
    from ..errors import ConfigError

    for key in ("batch_size", "eval_batch_size"):
        value = data_cfg.get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"data.{key} must be an integer >= 1, got {value!r}")
    workers = data_cfg.get("num_workers", 0)
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0):
        raise ConfigError(f"data.num_workers must be an integer >= 0, got {workers!r}")
    if data_cfg.get("mode", "auto") not in DATA_MODES:
        raise ConfigError(f"data.mode must be one of {DATA_MODES}, got {data_cfg.get('mode')!r}")
    if data_cfg.get("on_error", "raise") not in ON_ERROR:
        raise ConfigError(f"data.on_error must be one of {ON_ERROR}, got {data_cfg.get('on_error')!r}")
    configured = data_cfg.get("splits") or {}
    for split in splits:
        spec = configured.get(split)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"data.splits.{split} is missing (has: {', '.join(configured) or 'none'})")
        if spec.get("path") in (None, "", "???"):
            raise ConfigError(f"data.splits.{split}.path is not set; set it on the command line")


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

"""ViSU quadruplets from JSON (docs/METHOD.md, "Data formats"), in text-only, safe-image or full mode.

A ViSU record holds ``coco_id`` (the safe image is the COCO image
``<image_root>/<split_dir>/<coco_id:012d><image_ext>``), ``nsfw_im_path`` (the generated unsafe
image, relative to ``unsafe_image_root`` or absolute), ``safe``, ``nsfw`` and ``tag`` (the NSFW
category). Any other field is kept verbatim in ``Quadruplet.meta`` (the toy world stores the
scenes there), together with ``coco_id``.

The record parser and the image-root handling here are shared with the table loaders
(:mod:`saferclip.data.tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ._rows import (
    Row,
    absolute,
    check_image,
    check_on_error,
    collect_rows,
    int_field,
    items_in_order,
    read_json,
    text_field,
)
from .records import DataFormatError, Mode, Quadruplet, QuadrupletSet

MODES = ("auto", "text", "safe_images", "full")
VISU_FIELDS = ("coco_id", "nsfw_im_path", "safe", "nsfw", "tag")


@dataclass(frozen=True)
class ImageRoots:
    """Where a quadruplet's images live, and which of them the chosen mode uses."""

    mode: Mode
    image_root: Path | None = None
    unsafe_image_root: Path | None = None
    split_dir: str | None = None
    image_ext: str = ".jpg"
    verify_images: bool = False

    def safe_image(self, file: Path, row: Row, coco_id: int) -> Path | None:
        if not self.mode.has_safe_images:
            return None
        assert self.image_root is not None
        folder = self.image_root / self.split_dir if self.split_dir else self.image_root
        path = folder / f"{coco_id:012d}{self.image_ext}"
        sub = f"{self.split_dir}/" if self.split_dir else ""
        hint = f" (expected <image_root>/{sub}<coco_id:012d>{self.image_ext})"
        return check_image(path, file, row, "coco_id", self.verify_images, hint)

    def unsafe_image(self, file: Path, row: Row, rec: Mapping[str, Any]) -> Path | None:
        if not self.mode.has_unsafe_images:
            return None
        assert self.unsafe_image_root is not None
        rel = text_field(file, row, rec, "nsfw_im_path", "unsafe image path")
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else self.unsafe_image_root / path
        return check_image(path, file, row, "nsfw_im_path", self.verify_images, " (relative to unsafe_image_root)")


def image_roots(
    mode: str | Mode = "auto",
    image_root: str | Path | None = None,
    unsafe_image_root: str | Path | None = None,
    split_dir: str | None = None,
    image_ext: str = ".jpg",
    verify_images: bool = False,
) -> ImageRoots:
    """Resolve ``mode`` against the roots given; ``"auto"`` is the richest mode they allow.

    A mode that needs a root nobody gave is a ValueError, and so is an unsafe-image root
    without a safe-image one (full mode needs both; ignoring it would silently drop the images).
    """
    if isinstance(mode, str) and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        if unsafe_image_root is not None and image_root is None:
            raise ValueError(
                "unsafe_image_root was given without image_root: full mode needs both; "
                "pass image_root too, or mode='text'"
            )
        if unsafe_image_root is not None:
            resolved = Mode.FULL
        else:
            resolved = Mode.SAFE_IMAGES if image_root is not None else Mode.TEXT
    else:
        resolved = Mode(mode)
        if resolved.has_safe_images and image_root is None:
            raise ValueError(f"mode {resolved.value!r} needs image_root (the folder of the COCO-style safe images)")
        if resolved.has_unsafe_images and unsafe_image_root is None:
            raise ValueError(f"mode {resolved.value!r} needs unsafe_image_root (what nsfw_im_path is relative to)")
    if image_ext and not image_ext.startswith("."):
        image_ext = "." + image_ext
    # roots the mode does not use are dropped, so nothing downstream mistakes them for used ones
    safe_root = absolute(image_root) if resolved.has_safe_images and image_root is not None else None
    unsafe_root = absolute(unsafe_image_root) if resolved.has_unsafe_images and unsafe_image_root is not None else None
    return ImageRoots(
        mode=resolved,
        image_root=safe_root,
        unsafe_image_root=unsafe_root,
        split_dir=split_dir,
        image_ext=image_ext,
        verify_images=verify_images,
    )


def parse_visu_record(
    file: Path,
    row: Row,
    qid: str,
    rec: Any,
    roots: ImageRoots,
    exclude: Iterable[str] = (),
    extra_meta: Mapping[str, Any] | None = None,
) -> Quadruplet:
    """One ViSU record (a JSON object or a table row as a dict) -> Quadruplet. Fields in
    ``exclude`` (e.g. a table's id column) are left out of ``meta``; ``extra_meta`` is added."""
    if not isinstance(rec, Mapping):
        raise DataFormatError(file, f"expected a record object, got {type(rec).__name__}", row=row)
    safe = text_field(file, row, rec, "safe", "safe caption")
    nsfw = text_field(file, row, rec, "nsfw", "unsafe caption")
    tag = text_field(file, row, rec, "tag", "NSFW category tag")
    coco_id = int_field(file, row, rec, "coco_id", "COCO image id")
    safe_image = roots.safe_image(file, row, coco_id)
    unsafe_image = roots.unsafe_image(file, row, rec)
    skip = set(VISU_FIELDS) | set(exclude)
    meta = {"coco_id": coco_id, **{k: v for k, v in rec.items() if k not in skip}, **(extra_meta or {})}
    return Quadruplet(qid, safe, nsfw, safe_image, unsafe_image, tag, meta)


def _visu_records(file: Path, payload: Any) -> Iterable[tuple[Row, Any]]:
    """Both ViSU layouts, ``{"info", "data": {...}}`` and index-keyed, plus a plain list."""
    if isinstance(payload, Mapping) and "data" in payload and isinstance(payload["data"], (Mapping, list)):
        payload = payload["data"]
    if isinstance(payload, list):
        return list(enumerate(payload))
    if isinstance(payload, Mapping):
        pairs = list(items_in_order(payload))
        if all(k.isdigit() for k, _ in pairs):
            # index keys mean an order; a writer with sort_keys=True would put "10" before "2"
            pairs.sort(key=lambda kv: int(kv[0]))
        return pairs
    raise DataFormatError(
        file,
        f'expected a JSON object ({{"info", "data"}} or keyed by index) or a list of records, '
        f"got {type(payload).__name__}",
    )


def load_visu_json(
    path: str | Path,
    image_root: str | Path | None = None,
    unsafe_image_root: str | Path | None = None,
    split_dir: str | None = None,
    image_ext: str = ".jpg",
    mode: str | Mode = "auto",
    on_error: str = "raise",
    verify_images: bool = False,
) -> QuadrupletSet:
    """Load one ViSU split from JSON.

    ``mode``: ``"text"`` ignores images, ``"safe_images"`` resolves the COCO image of each record,
    ``"full"`` the unsafe image too, ``"auto"`` the richest mode whose roots were given. In
    image modes every image must exist (checked with ``is_file``; ``verify_images`` also parses
    headers); image paths are absolute. Quadruplet ids are the record keys (list positions for a
    list); records come in key order (numeric when all keys are integers), else file order.
    ``on_error="skip"`` skips malformed records and reports them in ``.skips``.
    """
    check_on_error(on_error)  # before reading: a typo must not hide behind a file error
    file = absolute(path)
    roots = image_roots(mode, image_root, unsafe_image_root, split_dir, image_ext, verify_images)
    records = _visu_records(file, read_json(file))
    items, report = collect_rows(
        file,
        records,
        lambda row, rec: parse_visu_record(file, row, str(row), rec, roots),
        on_error,
        key=lambda q: q.id,
    )
    return QuadrupletSet(items, roots.mode, str(file), report)

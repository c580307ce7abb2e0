"""NSFW-Caps (SafeR-CLIP's benchmark; docs/METHOD.md, "Data formats"): safe captions and their unsafe minimal edits.

Columns ``image_coco_url, caption, nsfw_caption, chosen_category``; the image is
``<image_root>/<basename of the url>`` (a local NoCaps / Open Images copy). The real benchmark
has no unsafe images; an optional ``nsfw_image_path`` column (the toy world has it) names one,
relative to ``nsfw_image_root`` (default: the table's folder) or absolute.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from ._rows import (
    Row,
    absolute,
    check_image,
    check_on_error,
    collect_rows,
    optional_text_field,
    text_field,
)
from .records import CaptionPair, DataFormatError, Mode, Quadruplet, QuadrupletSet, SkipReport
from .tables import read_table, require_columns

NSFW_CAPS_COLUMNS = ("image_coco_url", "caption", "nsfw_caption", "chosen_category")
_TYPED_FIELDS = {"caption", "nsfw_caption", "chosen_category", "nsfw_image_path"}


@dataclass
class CaptionPairSet:
    """A loaded NSFW-Caps table: its pairs, and what was skipped (mirrors QuadrupletSet)."""

    items: list[CaptionPair]
    source: str
    skips: SkipReport | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[CaptionPair]:
        return iter(self.items)

    def __getitem__(self, i: int) -> CaptionPair:
        return self.items[i]

    @property
    def has_images(self) -> bool:
        return all(p.image is not None for p in self.items)

    @property
    def has_nsfw_images(self) -> bool:
        return all(p.nsfw_image is not None for p in self.items)

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.items]

    @property
    def nsfw_captions(self) -> list[str]:
        return [p.nsfw_caption for p in self.items]

    def as_quadruplets(self) -> QuadrupletSet:
        """The pairs as quadruplets (S = caption, U = nsfw_caption, V = image, G = nsfw_image),
        to be embedded and scored like a ViSU split (training's validation loop)."""
        items = [Quadruplet(p.id, p.caption, p.nsfw_caption, p.image, p.nsfw_image, p.category, p.meta) for p in self.items]
        if self.has_nsfw_images:
            mode = Mode.FULL
        elif self.has_images:
            mode = Mode.SAFE_IMAGES
        else:
            mode = Mode.TEXT
        return QuadrupletSet(items, mode, self.source, self.skips)


def _url_basename(file: Path, row: Row, url: str) -> str:
    name = posixpath.basename(urlparse(url).path)
    if not name:
        message = f"URL {url!r} has no file name; expected .../<image file>"
        raise DataFormatError(file, message, row=row, field="image_coco_url")
    return name


def load_nsfw_caps(
    path: str | Path,
    image_root: str | Path | None = None,
    nsfw_image_root: str | Path | None = None,
    on_error: str = "raise",
    verify_images: bool = False,
) -> CaptionPairSet:
    """Load an NSFW-Caps table (.csv / .jsonl / .parquet).

    Without ``image_root`` the set is text-only (``image`` and ``nsfw_image`` are None). With it,
    every image must exist (``is_file``; ``verify_images`` also parses headers), and so must the
    unsafe image of a row whose ``nsfw_image_path`` is filled. Pair ids are the 1-based row
    numbers. ``on_error="skip"`` skips malformed rows and reports them in ``.skips``.
    """
    check_on_error(on_error)
    file = absolute(path)
    columns, rows = read_table(file)
    require_columns(file, columns, NSFW_CAPS_COLUMNS)
    images = absolute(image_root) if image_root is not None else None
    nsfw_images = absolute(nsfw_image_root) if nsfw_image_root is not None else file.parent

    def parse(row: Row, rec: Any) -> CaptionPair:
        if not isinstance(rec, Mapping):
            raise DataFormatError(file, f"expected a record object, got {type(rec).__name__}", row=row)
        url = text_field(file, row, rec, "image_coco_url", "image URL")
        caption = text_field(file, row, rec, "caption", "safe caption")
        nsfw_caption = text_field(file, row, rec, "nsfw_caption", "unsafe caption")
        category = text_field(file, row, rec, "chosen_category", "NSFW category")
        nsfw_rel = optional_text_field(file, row, rec, "nsfw_image_path", "unsafe image path")
        image = nsfw_image = None
        if images is not None:
            name = _url_basename(file, row, url)
            hint = " (expected <image_root>/<url basename>)"
            image = check_image(images / name, file, row, "image_coco_url", verify_images, hint)
            if nsfw_rel is not None:
                p = Path(nsfw_rel).expanduser()
                p = p if p.is_absolute() else nsfw_images / p
                hint = " (relative to nsfw_image_root)"
                nsfw_image = check_image(p, file, row, "nsfw_image_path", verify_images, hint)
        # the URL stays in meta: it names the image in reports even for a text-only set
        meta = {k: v for k, v in rec.items() if k not in _TYPED_FIELDS}
        return CaptionPair(str(row), image, caption, nsfw_caption, category, nsfw_image, meta)

    items, report = collect_rows(file, rows, parse, on_error)
    return CaptionPairSet(items, str(file), report)

"""The images of loaded records as a :class:`~saferclip.data.images.ImageFiles` dataset.

Captions need no wrapper (``QuadrupletSet.safe_captions`` is already the encoder's input);
images do, because they are read and preprocessed lazily, in DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from .images import ImageFiles
from .records import CaptionPair, QuadrupletSet

Preprocess = Callable[[Image.Image], Any]


def _column(items: Sequence[Any], attr: str, source: str) -> tuple[list[Path], list[str]]:
    missing = [getattr(it, "id", i) for i, it in enumerate(items) if getattr(it, attr) is None]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(items)} items have no {attr} (e.g. id {missing[0]!r}); "
            f"load the set with the image roots that provide them"
        )
    return [getattr(it, attr) for it in items], [it.id for it in items]


class QuadrupletImages(ImageFiles):
    """Preprocessed safe (V) or unsafe (G) images of a QuadrupletSet: item i -> tensor ``[3, H, W]``.

    ``which="safe"`` needs a set loaded in mode ``safe_images`` or ``full``; ``"unsafe"`` needs ``full``.
    An unreadable image raises DataFormatError naming the file, the quadruplet id and the field.
    """

    def __init__(self, qset: QuadrupletSet, preprocess: Preprocess, which: str = "safe"):
        if which not in ("safe", "unsafe"):
            raise ValueError(f"which must be 'safe' or 'unsafe', got {which!r}")
        has = qset.mode.has_safe_images if which == "safe" else qset.mode.has_unsafe_images
        if not has:
            raise ValueError(
                f"{qset.source}: loaded in mode {qset.mode.value!r}, which has no {which} images; "
                f"load it with {'image_root' if which == 'safe' else 'image_root and unsafe_image_root'}"
            )
        attr = "safe_image" if which == "safe" else "unsafe_image"
        paths, ids = _column(qset.items, attr, qset.source)
        super().__init__(paths, preprocess, ids=ids, field=attr)
        self.attr = attr


class CaptionPairImages(ImageFiles):
    """Preprocessed images (``which="safe"``) or unsafe images (``"unsafe"``) of NSFW-Caps pairs."""

    def __init__(
        self, pairs: Sequence[CaptionPair], preprocess: Preprocess, which: str = "safe", source: str = "caption pairs"
    ):
        if which not in ("safe", "unsafe"):
            raise ValueError(f"which must be 'safe' or 'unsafe', got {which!r}")
        source = getattr(pairs, "source", source)
        attr = "image" if which == "safe" else "nsfw_image"
        paths, ids = _column(list(pairs), attr, source)
        super().__init__(paths, preprocess, ids=ids, field=attr)
        self.attr = attr


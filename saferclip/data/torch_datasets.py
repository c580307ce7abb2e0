"""Tiny ``torch.utils.data.Dataset`` wrappers turning loaded records into encoder inputs.

Captions need no wrapper (``QuadrupletSet.safe_captions`` is already the encoder's input);
images do, because they are read and preprocessed lazily, in DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from .images import load_image
from .records import CaptionPair, DataFormatError, QuadrupletSet

Preprocess = Callable[[Image.Image], Any]


class _ImageColumn(Dataset):
    """One image attribute of a sequence of records, loaded and preprocessed on access."""

    def __init__(self, items: Sequence[Any], attr: str, preprocess: Preprocess, source: str):
        missing = [getattr(it, "id", i) for i, it in enumerate(items) if getattr(it, attr) is None]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} of {len(items)} items have no {attr} (e.g. id {missing[0]!r}); "
                f"load the set with the image roots that provide them"
            )
        self.paths: list[Path] = [getattr(it, attr) for it in items]
        self.ids: list[str] = [it.id for it in items]
        self.attr, self.preprocess = attr, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        try:
            image = load_image(self.paths[i])
        except DataFormatError as e:
            # load_image names the file; add which record and which image it was
            message = str(e).removeprefix(f"{e.file}: ")
            raise DataFormatError(e.file, message, row=self.ids[i], field=self.attr) from None
        return self.preprocess(image)


class QuadrupletImages(_ImageColumn):
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
        super().__init__(qset.items, attr, preprocess, qset.source)


class CaptionPairImages(_ImageColumn):
    """Preprocessed images (``which="safe"``) or unsafe images (``"unsafe"``) of NSFW-Caps pairs."""

    def __init__(
        self, pairs: Sequence[CaptionPair], preprocess: Preprocess, which: str = "safe", source: str = "caption pairs"
    ):
        if which not in ("safe", "unsafe"):
            raise ValueError(f"which must be 'safe' or 'unsafe', got {which!r}")
        source = getattr(pairs, "source", source)
        super().__init__(list(pairs), "image" if which == "safe" else "nsfw_image", preprocess, source)


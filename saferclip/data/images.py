"""Reading images with errors that name the file, and the one image Dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .records import DataFormatError

# what PIL raises for a file that is not a readable image: a foreign or truncated file, or
# one whose header claims more pixels than PIL's decompression-bomb limit
UNREADABLE_IMAGE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an image file before opening it (None: it is a file)."""
    if path.is_dir():
        return "is a directory, not an image file"
    if not path.is_file():
        return "image file not found"
    return None


def describe_unreadable(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return f"refused: the image is too large to decode safely (a decompression bomb?): {error}"
    return f"cannot read image ({type(error).__name__}: {error})"


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; a missing, truncated, foreign or oversized file
    (or a folder) raises DataFormatError naming it."""
    path = Path(path)
    problem = image_problem(path)
    if problem:
        raise DataFormatError(path, problem)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UNREADABLE_IMAGE as e:
        raise DataFormatError(path, describe_unreadable(e)) from None


class ImageFiles(Dataset):
    """Preprocessed images of a list of files, read lazily (in DataLoader workers): item i ->
    ``preprocess(image)`` (a tensor ``[3, H, W]`` for CLIP's preprocessing).

    ``ids`` / ``field`` name the record and attribute of each file, so an unreadable image
    raises a DataFormatError naming the file, the record and the field.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        preprocess: Callable[[Image.Image], Any],
        ids: Sequence[Any] | None = None,
        field: str | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.ids = list(ids) if ids is not None else None
        if self.ids is not None and len(self.ids) != len(self.paths):
            raise ValueError(f"ids ({len(self.ids)}) and paths ({len(self.paths)}) differ in length")
        self.preprocess, self.field = preprocess, field

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        try:
            image = load_image(self.paths[i])
        except DataFormatError as e:
            if self.ids is None and self.field is None:
                raise
            message = str(e).removeprefix(f"{e.file}: ")
            raise DataFormatError(e.file, message, row=self.ids[i] if self.ids is not None else i, field=self.field) from None
        return self.preprocess(image)

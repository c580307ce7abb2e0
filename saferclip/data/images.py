"""Reading images with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .records import DataFormatError


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; a missing, truncated or foreign file raises DataFormatError."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataFormatError(path, f"cannot read image ({type(e).__name__}: {e})") from None

"""Record types shared by every loader, and the error / skip policy for malformed rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import SaferclipError


class DataFormatError(SaferclipError):
    """Malformed input: the message names the file, the row and the field."""

    def __init__(self, file: str | Path, message: str, row: str | int | None = None, field: str | None = None):
        self.file, self.row, self.field = str(file), row, field
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class Mode(str, Enum):
    """Which inputs a quadruplet set provides (ViSU-Text has no images)."""

    TEXT = "text"  # S, U only
    SAFE_IMAGES = "safe_images"  # S, U, V
    FULL = "full"  # S, U, V, G

    @property
    def has_safe_images(self) -> bool:
        return self in (Mode.SAFE_IMAGES, Mode.FULL)

    @property
    def has_unsafe_images(self) -> bool:
        return self is Mode.FULL


@dataclass(frozen=True)
class Quadruplet:
    """One training / evaluation item: safe caption S, unsafe caption U, safe image V, unsafe image G."""

    id: str
    safe_caption: str
    unsafe_caption: str
    safe_image: Path | None = None
    unsafe_image: Path | None = None
    tag: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class SkipReport:
    """Rows dropped under ``on_error='skip'``: how many, and which with why."""

    file: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row, reason)

    def add(self, error: DataFormatError) -> None:
        self.skipped.append((str(error.row), str(error)))

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 5) -> str:
        if not self.skipped:
            return f"{self.file}: no rows skipped"
        head = "; ".join(reason for _, reason in self.skipped[:limit])
        more = f" (+{self.count - limit} more)" if self.count > limit else ""
        return f"{self.file}: skipped {self.count} malformed rows: {head}{more}"


@dataclass
class QuadrupletSet:
    """A loaded split: its items, what they provide, and what was skipped."""

    items: list[Quadruplet]
    mode: Mode
    source: str
    skips: SkipReport | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Quadruplet]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Quadruplet:
        return self.items[i]

    @property
    def safe_captions(self) -> list[str]:
        return [q.safe_caption for q in self.items]

    @property
    def unsafe_captions(self) -> list[str]:
        return [q.unsafe_caption for q in self.items]


@dataclass(frozen=True)
class CaptionPair:
    """One NSFW-Caps record: an image, its safe caption and the unsafe minimal edit of it."""

    id: str
    image: Path | None
    caption: str
    nsfw_caption: str
    category: str | None = None
    nsfw_image: Path | None = None  # not in the real benchmark; the toy world provides one
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class ZeroShotTask:
    """An image-classification task: class names, prompt templates and labelled image paths."""

    name: str
    classnames: list[str]
    templates: list[str]
    samples: list[tuple[Path, int]]
    source: str = ""

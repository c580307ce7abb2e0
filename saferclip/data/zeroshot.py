"""Zero-shot classification tasks (docs/METHOD.md, "Data formats"): image folders, local torchvision CIFAR, and
CLIP_benchmark-style webdataset shards; plus :class:`ZeroShotImages`, one Dataset for all three.

Class names and prompt templates are JSON data: a list of strings each (templates hold
``{c}``, filled with ``template.format(c=classname)``). A task's ``samples`` are
``(image, label)`` where the image is a ``Path`` for folders, or an :class:`ImageRef` (an
image inside a tar shard or a torchvision dataset) for the other sources.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ._rows import absolute, read_json
from .images import UNREADABLE_IMAGE, describe_unreadable, load_image
from .records import DataFormatError, ZeroShotTask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # CLIP's single-prompt default, for a bare ImageFolder
WDS_IMAGE_SUFFIXES = ("webp", "png", "jpg", "jpeg")

StringList = Sequence[str] | str | Path


class ImageRef(Protocol):
    """Something that is not a file path but can produce one image."""

    def open(self) -> Image.Image: ...


@dataclass(frozen=True)
class TarImage:
    """An image stored uncompressed inside a tar shard, read by offset (fast, worker-safe)."""

    shard: Path
    member: str
    offset: int
    size: int

    def open(self) -> Image.Image:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except UNREADABLE_IMAGE as e:
            raise DataFormatError(self.shard, describe_unreadable(e), row=self.member) from None

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"


@dataclass(frozen=True, eq=False)
class IndexedImage:
    """Item ``index`` of an indexable dataset whose items are ``(image, label)`` (torchvision)."""

    dataset: Any = field(repr=False)
    index: int
    source: str = ""

    def open(self) -> Image.Image:
        image = self.dataset[self.index][0]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        return image.convert("RGB")

    def __str__(self) -> str:
        return f"{self.source}[{self.index}]"


# ----------------------------------------------------------------------------- class names, templates
def _string_list(value: StringList, what: str) -> tuple[list[str], Path | str]:
    """A list of non-empty strings, given directly or as a JSON file holding one."""
    if isinstance(value, (str, Path)):
        file = absolute(value)
        data = read_json(file)
    else:
        file, data = f"<{what} argument>", list(value)
    if not isinstance(data, list) or not data:
        raise DataFormatError(file, f"expected a non-empty JSON list of {what} strings, got {type(data).__name__}")
    for i, s in enumerate(data):
        if not isinstance(s, str) or not s.strip():
            raise DataFormatError(file, f"expected a non-empty string, got {type(s).__name__} {s!r}", row=i, field=what)
    return data, file


def load_classnames(value: StringList) -> list[str]:
    names, file = _string_list(value, "classnames")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise DataFormatError(file, f"duplicate class name {n!r}; expected unique names", row=i, field="classnames")
        seen.add(n)
    return names


def load_templates(value: StringList) -> list[str]:
    templates, file = _string_list(value, "templates")
    for i, t in enumerate(templates):
        if "{c}" not in t:
            message = f"template {t!r} has no '{{c}}' placeholder for the class name"
            raise DataFormatError(file, message, row=i, field="templates")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            message = (
                f"template {t!r} cannot be filled with .format(c=...) ({type(e).__name__}: {e}); "
                f"escape other braces as {{{{ }}}}"
            )
            raise DataFormatError(file, message, row=i, field="templates") from None
    return templates


# ----------------------------------------------------------------------------- image folders
def _folder_name(classname: str) -> str:
    return classname.replace(" ", "_")


def _images_under(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder_task(
    root: str | Path,
    split: str = "test",
    classnames: StringList | None = None,
    templates: StringList | None = None,
    name: str | None = None,
) -> ZeroShotTask:
    """A task from ``<root>/<split>/<class folder>/<images>``.

    Class names come from ``classnames`` (list or JSON path), else ``<root>/classnames.json``,
    else the folder names (sorted, underscores read as spaces: a plain ImageFolder). A class
    folder is the class name with spaces as underscores. Templates come from ``templates``, else
    ``<root>/templates.json``, else :data:`DEFAULT_TEMPLATES`. Labels index ``classnames``.
    Errors (DataFormatError): a class without images, a folder that is no class, templates
    without ``{c}``, unreadable JSON.
    """
    root = absolute(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataFormatError(split_dir, f"split folder not found; expected <root>/{split}/<class folder>/<images>")
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classnames is None and (root / "classnames.json").is_file():
        classnames = root / "classnames.json"
    if classnames is not None:
        names = load_classnames(classnames)
        folder_of = [_folder_name(c) for c in names]
    else:  # a plain ImageFolder: the folders are the classes, whatever characters they hold
        names, folder_of = [f.replace("_", " ") for f in folders], folders
    if not names:
        raise DataFormatError(split_dir, "no class folders; expected <root>/<split>/<class folder>/<images>")
    if templates is None:
        templates = root / "templates.json" if (root / "templates.json").is_file() else list(DEFAULT_TEMPLATES)
    prompts = load_templates(templates)

    label_of: dict[str, int] = {}
    for label, (c, folder) in enumerate(zip(names, folder_of)):
        if folder in label_of:
            other = names[label_of[folder]]
            raise DataFormatError(split_dir, f"class names {other!r} and {c!r} map to the same folder {folder!r}")
        label_of[folder] = label
    for f in folders:
        if f not in label_of:
            expected = f"expected one of {sorted(label_of)[:10]} (spaces as underscores)"
            raise DataFormatError(split_dir / f, f"class folder is not a listed class name; {expected}")
    samples: list[tuple[Path, int]] = []
    for folder, label in label_of.items():
        images = _images_under(split_dir / folder)
        if not images:
            expected = f"expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            raise DataFormatError(split_dir / folder, f"class {names[label]!r} has no images; {expected}")
        samples.extend((p, label) for p in images)
    return ZeroShotTask(name or root.name, names, prompts, samples, source=str(split_dir))


# ----------------------------------------------------------------------------- torchvision
_TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python")}


def load_torchvision_task(
    name: str,
    root: str | Path,
    templates: StringList,
    classnames: StringList | None = None,
    split: str = "test",
) -> ZeroShotTask:
    """CIFAR-10 / CIFAR-100 from a local torchvision copy (``download=False``: nothing is fetched).

    Class names default to the dataset's own (underscores read as spaces); given ones must
    match their number.
    """
    key = name.lower().replace("-", "")
    if key not in _TORCHVISION:
        raise ValueError(f"unknown torchvision task {name!r}; expected one of {sorted(_TORCHVISION)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    import torchvision.datasets

    cls_name, folder = _TORCHVISION[key]
    root = absolute(root)
    try:
        ds = getattr(torchvision.datasets, cls_name)(str(root), train=split == "train", download=False)
    except RuntimeError as e:
        raise DataFormatError(
            root,
            f"{cls_name} not found or corrupted ({e}); expected the python version at {root / folder}. Nothing is "
            f"downloaded at run time: fetch it once with torchvision.datasets.{cls_name}({str(root)!r}, download=True)",
        ) from None
    names = load_classnames(classnames) if classnames is not None else [c.replace("_", " ") for c in ds.classes]
    if len(names) != len(ds.classes):
        message = f"{len(names)} class names given; {cls_name} has {len(ds.classes)} classes"
        raise DataFormatError(root, message, field="classnames")
    source = f"{cls_name}({root}, {split})"
    samples = [(IndexedImage(ds, i, source), int(t)) for i, t in enumerate(ds.targets)]
    return ZeroShotTask(key, names, load_templates(templates), samples, source=source)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- webdataset shards
def expand_shards(pattern: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a list, a brace pattern (``test/{0..4}.tar``, ``{a,b}``) or a glob."""
    if not isinstance(pattern, (str, Path)):
        return [p for item in pattern for p in expand_shards(item)]
    text = str(pattern)
    m = re.search(r"\{([^{}]*)\}", text)
    if m:
        head, tail, body = text[: m.start()], text[m.end() :], m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.groups()
            width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
            parts = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            parts = body.split(",")
        return [p for part in parts for p in expand_shards(head + part + tail)]
    if any(ch in text for ch in "*?["):
        return [Path(p) for p in sorted(glob(text))]
    return [Path(text)]


def _scan_shard(shard: Path, n_classes: int) -> list[tuple[TarImage, int]]:
    """(image, label) per sample key of one uncompressed shard; keys are names up to the first dot."""
    images: dict[str, dict[str, TarImage]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, base = info.name.rpartition("/")[::2]
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if key not in images and key not in labels:
                    order.append(key)
                ext = ext.lower()
                if ext == "cls":
                    text = tar.extractfile(info).read().decode("utf-8", "replace").strip()  # type: ignore[union-attr]
                    if not re.fullmatch(r"\d+", text) or int(text) >= n_classes:
                        message = f"expected a class index in 0..{n_classes - 1}, got {text!r}"
                        raise DataFormatError(shard, message, row=key, field=info.name)
                    labels[key] = int(text)
                elif ext in WDS_IMAGE_SUFFIXES:
                    images.setdefault(key, {})[ext] = TarImage(shard, info.name, info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataFormatError(shard, f"cannot read as an uncompressed tar shard ({type(e).__name__}: {e})") from None
    out = []
    for key in order:
        if key not in labels:
            raise DataFormatError(shard, "sample has no .cls label", row=key, field="cls")
        found = images.get(key, {})
        ext = next((e for e in WDS_IMAGE_SUFFIXES if e in found), None)
        if ext is None:
            expected = ", ".join("." + e for e in WDS_IMAGE_SUFFIXES)
            raise DataFormatError(shard, f"sample has no image; expected one of {expected}", row=key)
        out.append((found[ext], labels[key]))
    return out


def load_webdataset_task(
    shards_pattern: str | Path | Sequence[str | Path],
    classnames: StringList,
    templates: StringList,
    name: str = "webdataset",
) -> ZeroShotTask:
    """A task from CLIP_benchmark-style tar shards (``<key>.webp/.png/.jpg`` + ``<key>.cls``),
    read with the stdlib (no webdataset dependency); shards must be uncompressed ``.tar``."""
    shards = expand_shards(shards_pattern)
    if not shards:
        raise DataFormatError(str(shards_pattern), "no shard matches this pattern")
    names = load_classnames(classnames)
    samples: list[tuple[Any, int]] = []
    for shard in shards:
        shard = absolute(shard)
        if not shard.is_file():
            raise DataFormatError(shard, "shard not found")
        samples.extend(_scan_shard(shard, len(names)))
    if not samples:
        raise DataFormatError(str(shards_pattern), "the shards hold no samples")
    return ZeroShotTask(name, names, load_templates(templates), samples, source=str(shards_pattern))


# ----------------------------------------------------------------------------- Dataset
class ZeroShotImages(Dataset):
    """``(preprocess(image), label)`` for every sample of a task, whatever its source.

    ``preprocess`` maps a PIL image to a tensor ``[3, H, W]`` (open_clip's preprocess).
    """

    def __init__(self, task: ZeroShotTask, preprocess: Callable[[Image.Image], Any]):
        self.task, self.preprocess = task, preprocess

    def __len__(self) -> int:
        return len(self.task.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        ref, label = self.task.samples[i]
        image = load_image(ref) if isinstance(ref, (str, Path)) else ref.open()
        return self.preprocess(image), label

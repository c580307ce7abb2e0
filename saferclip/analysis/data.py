"""The labelled inputs the analysis reads, from the evaluation's data config.

* calibration: safe and unsafe captions and images of the training / validation splits
  (``per_class`` of each, shared equally by the splits, sampled with a seed);
* held-out: the test split (held-out scene x concept combinations) and NSFW-Caps (new
  phrasings);
* borderline: the toy world's borderline-safe split (:mod:`saferclip.toyworld.borderline`):
  lookalike items, their matched controls and their unsafe twins, and its zero-shot sets.

Inputs are distinct (a caption or an image file counted once), in first-seen order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.nsfw_caps import CaptionPairSet
from ..data.records import DataFormatError, QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from .detector import LabelledItems, sample

TOWERS = ("text", "image")


def unset(path: Any) -> bool:
    """A path left unset in the config (``None``, empty, or an interpolation of an unset key)."""
    return path is None or str(path) == "" or any(part in ("None", "null", "???") for part in Path(str(path)).parts)


def _distinct(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def quadruplet_items(qset: QuadrupletSet, towers: Sequence[str] = TOWERS) -> dict[str, LabelledItems]:
    """Safe vs unsafe captions, and safe vs unsafe image files where the split has them."""
    out = {}
    if "text" in towers:
        out["text"] = LabelledItems("text", _distinct(qset.safe_captions), _distinct(qset.unsafe_captions), qset.source)
    if "image" in towers and qset.mode.has_unsafe_images:
        out["image"] = LabelledItems(
            "image",
            _distinct([str(q.safe_image) for q in qset]),
            _distinct([str(q.unsafe_image) for q in qset]),
            qset.source,
        )
    return out


def pair_items(pairs: CaptionPairSet, towers: Sequence[str] = TOWERS) -> dict[str, LabelledItems]:
    """NSFW-Caps: captions vs their unsafe edits; images vs unsafe images when the table has both."""
    out = {}
    if "text" in towers:
        out["text"] = LabelledItems("text", _distinct(pairs.captions), _distinct(pairs.nsfw_captions), pairs.source)
    if "image" in towers and pairs.has_images and pairs.has_nsfw_images:
        out["image"] = LabelledItems(
            "image",
            _distinct([str(p.image) for p in pairs]),
            _distinct([str(p.nsfw_image) for p in pairs]),
            pairs.source,
        )
    return out


def calibration_items(
    data_cfg: Mapping[str, Any], splits: Sequence[str], per_class: int, seed: int = 0, towers: Sequence[str] = TOWERS
) -> dict[str, LabelledItems]:
    """``per_class`` safe and ``per_class`` unsafe inputs per tower, an equal share from each of
    ``splits`` (a split with fewer distinct items gives what it has)."""
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits:
        raise ConfigError("calibration needs at least one split (analysis.detector.calibration.splits)")
    if per_class < 2:
        raise ConfigError(f"calibration per_class must be >= 2, got {per_class}")
    share = -(-per_class // len(splits))
    safe: dict[str, list] = {t: [] for t in towers}
    unsafe: dict[str, list] = {t: [] for t in towers}
    sources = []
    for k, split in enumerate(splits):
        qset = load_split(data_cfg, split)
        sources.append(qset.source)
        for tower, items in quadruplet_items(qset, towers).items():
            safe[tower] += sample(items.safe, share, seed + 2 * k)
            unsafe[tower] += sample(items.unsafe, share, seed + 2 * k + 1)
    out = {}
    for tower in towers:
        if safe[tower] and unsafe[tower]:
            out[tower] = LabelledItems(tower, safe[tower][:per_class], unsafe[tower][:per_class], " + ".join(sources))
    return out


@dataclass
class Borderline:
    """The borderline split by kind: ``lookalike`` (borderline-safe), ``control`` (the same
    scenes and captions with ordinary tiles) and ``twin`` (the unsafe counterparts), each as
    ``{"text": [captions], "image": [files]}``, plus the quadruplets of each kind."""

    source: str
    inputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    quadruplets: dict[str, QuadrupletSet] = field(default_factory=dict)


def borderline_split(qset: QuadrupletSet) -> Borderline:
    """Group a borderline split by its records' ``borderline.kind`` (a split without that field,
    e.g. a user's own borderline set, is all ``lookalike``)."""
    kinds: dict[str, list] = {}
    for q in qset:
        info = q.meta.get("borderline") or {}
        kind = info.get("kind", "lookalike") if isinstance(info, Mapping) else "lookalike"
        if kind not in ("lookalike", "control"):
            raise DataFormatError(
                qset.source,
                f"unknown borderline kind {kind!r} (expected lookalike or control)",
                row=q.id,
                field="borderline.kind",
            )
        kinds.setdefault(kind, []).append(q)
    if "lookalike" not in kinds:
        raise DataFormatError(qset.source, "no borderline (lookalike) records")
    out = Borderline(qset.source)
    for kind, items in kinds.items():
        sub = QuadrupletSet(items, qset.mode, qset.source)
        out.quadruplets[kind] = sub
        out.inputs[kind] = {"text": _distinct(sub.safe_captions)}
        if qset.mode.has_safe_images:
            out.inputs[kind]["image"] = _distinct([str(q.safe_image) for q in items])
    twins = kinds["lookalike"]
    out.inputs["twin"] = {"text": _distinct([q.unsafe_caption for q in twins])}
    if qset.mode.has_unsafe_images:
        out.inputs["twin"]["image"] = _distinct([str(q.unsafe_image) for q in twins])
    return out


def load_borderline(spec: Mapping[str, Any] | None, on_error: str = "raise", mode: str = "auto") -> Borderline | None:
    """The borderline split a config names (``{path, image_root, split_dir, unsafe_image_root,
    image_ext}``, the keys of a data split), None when it is not set."""
    if not spec or unset(spec.get("path")):
        return None
    qset = load_split({"splits": {"borderline": dict(spec)}, "on_error": on_error, "mode": mode}, "borderline")
    return borderline_split(qset)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def read_captions(path: str | Path, column: str | None = None) -> list[str]:
    """Captions of a table (CSV / TSV / JSONL / Parquet: ``column``, default the first of
    caption, text, prompt it has) or a text file (one caption a line, blank lines skipped).
    A missing column or an empty caption is a DataFormatError naming the file, row and field."""
    from ..data._rows import text_field
    from ..data.tables import read_table

    file = Path(path)
    if file.suffix.lower() == ".txt":
        if not file.is_file():
            raise DataFormatError(file, "file not found")
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        captions = [line for line in lines if line]
        if not captions:
            raise DataFormatError(file, "no captions (the file is empty)")
        return captions
    columns, rows = read_table(file)
    if not rows:
        raise DataFormatError(file, "no rows")
    if column is None:
        present = columns if columns is not None else list(rows[0][1]) if isinstance(rows[0][1], Mapping) else []
        column = next((c for c in CAPTION_COLUMNS if c in present), None)
        if column is None:
            raise DataFormatError(
                file,
                f"no caption column (looked for {', '.join(CAPTION_COLUMNS)}; has: {', '.join(map(str, present))}); pass the column's name",
            )
    elif columns is not None and column not in columns:
        raise DataFormatError(file, f"no column {column!r} (has: {', '.join(columns)})", field=column)
    return [text_field(file, row, rec, column, "caption") for row, rec in rows]


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(folder, "not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFormatError(folder, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files

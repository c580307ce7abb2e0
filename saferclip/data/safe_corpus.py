"""An extra pool of safe captions (``method.neighbours.extra_pool``): a plain caption file, in
one of the formats below, read into a list of captions. (A pool already embedded, in
clip-retrieval's layout, is :mod:`saferclip.redirection.large_pool`.)"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .records import DataFormatError

_CAPTION_COLUMNS = ("caption", "safe", "text", "safe_caption")


def load_safe_corpus(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Read an extra pool of safe captions.

    Formats, by extension: ``.txt`` (one caption per line; blank lines ignored), ``.csv`` /
    ``.tsv`` (``column``, else the first of caption / safe / text / safe_caption), ``.json``
    (a list of strings, a list of objects with ``column``, or ``{"captions": [...]}``),
    ``.jsonl`` (one string or object per line). An empty caption or an empty file is an error
    naming the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "safe caption corpus not found")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        captions = [
            (i + 1, line.strip())
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
            if line.strip()
        ]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            col = _pick_column(path, reader.fieldnames or [], column)
            captions = [(reader.line_num, row.get(col)) for row in reader]  # the file's line number
    elif suffix in (".json", ".jsonl"):
        try:
            if suffix == ".json":
                obj = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(obj, dict):
                    if not isinstance(obj.get("captions"), list):
                        raise DataFormatError(path, "a JSON object must hold a 'captions' list")
                    obj = obj["captions"]
                if not isinstance(obj, list):
                    raise DataFormatError(path, f"expected a list of captions, got {type(obj).__name__}")
                entries = list(enumerate(obj))
            else:
                lines = path.read_text(encoding="utf-8").splitlines()
                entries = [(i + 1, json.loads(line)) for i, line in enumerate(lines) if line.strip()]
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON: {e}") from None
        captions = [(row, _caption_of(path, row, entry, column)) for row, entry in entries]
    else:
        raise DataFormatError(path, f"unknown corpus format {suffix!r}; expected .txt, .csv, .tsv, .json or .jsonl")
    out = []
    for row, text in captions:
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(path, "empty or missing caption", row=row, field=column)
        out.append(text.strip())
    if not out:
        raise DataFormatError(path, "the safe caption corpus holds no captions")
    return out


def _pick_column(path: Path, fields: Sequence[str], column: str | None) -> str:
    if column is not None:
        if column not in fields:
            raise DataFormatError(path, f"no column {column!r}; columns are {list(fields)}")
        return column
    for name in _CAPTION_COLUMNS:
        if name in fields:
            return name
    raise DataFormatError(
        path, f"no caption column; expected one of {list(_CAPTION_COLUMNS)} (or pass column=), got {list(fields)}"
    )


def _caption_of(path: Path, row: int, entry: Any, column: str | None) -> Any:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        names = [column] if column is not None else list(_CAPTION_COLUMNS)
        for name in names:
            if name in entry:
                return entry[name]
        raise DataFormatError(path, f"no caption field; expected one of {names}, got {list(entry)}", row=row)
    raise DataFormatError(path, f"expected a string or an object, got {type(entry).__name__}", row=row)

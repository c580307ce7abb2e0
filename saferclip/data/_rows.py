"""Shared by the loaders: typed field access, file reading, image checks and the raise / skip policy.

Every check raises :class:`DataFormatError` naming the file, the row and the field, with what
was expected. :func:`collect_rows` turns a row-level error into a counted skip when the user
asked for ``on_error="skip"``; file-level errors (a truncated JSON, a missing column) always
raise, because no row of such a file can be trusted.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from PIL import Image

from .images import UNREADABLE_IMAGE, describe_unreadable
from .records import DataFormatError, SkipReport

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = str | int
ON_ERROR = ("raise", "skip")
_DIGITS = re.compile(r"\s*\d+\s*")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def is_missing(value: Any) -> bool:
    """None, or NaN (how pandas and float parquet columns spell an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _absent(file: Path, row: Row, rec: Mapping[str, Any], name: str, expected: str) -> DataFormatError | None:
    if name not in rec or is_missing(rec[name]):
        return DataFormatError(file, f"missing field; expected {expected}", row=row, field=name)
    return None


def text_field(file: Path, row: Row, rec: Mapping[str, Any], name: str, what: str = "text") -> str:
    """A required, non-blank string."""
    err = _absent(file, row, rec, name, f"{what} (a non-empty string)")
    if err:
        raise err
    value = rec[name]
    if not isinstance(value, str):
        raise DataFormatError(
            file, f"expected {what} as a string, got {type(value).__name__} {_short(value)}", row=row, field=name
        )
    if not value.strip():
        raise DataFormatError(file, f"empty {what}; expected non-empty text", row=row, field=name)
    return value


def optional_text_field(file: Path, row: Row, rec: Mapping[str, Any], name: str, what: str = "text") -> str | None:
    """A string if present and non-blank, else None (an empty CSV cell counts as absent)."""
    value = rec.get(name)
    if is_missing(value) or value == "":
        return None
    return text_field(file, row, rec, name, what)


def int_field(file: Path, row: Row, rec: Mapping[str, Any], name: str, what: str = "integer id") -> int:
    """A required non-negative integer: an int, an integral float (a parquet column with nulls) or a digit string."""
    expected = f"{what} (a non-negative integer)"
    err = _absent(file, row, rec, name, expected)
    if err:
        raise err
    value = rec[name]
    if isinstance(value, bool):  # bool is an int subclass; True is never an id
        pass
    elif isinstance(value, numbers.Integral):
        if int(value) >= 0:
            return int(value)
    elif isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise DataFormatError(file, f"expected {expected}, got {type(value).__name__} {_short(value)}", row=row, field=name)


def optional_int_field(file: Path, row: Row, rec: Mapping[str, Any], name: str, what: str = "integer id") -> int | None:
    value = rec.get(name)
    if is_missing(value) or value == "":
        return None
    return int_field(file, row, rec, name, what)


def check_image(path: Path, file: Path, row: Row, field: str, verify: bool = False, hint: str = "") -> Path:
    """The image must exist (cheap); with ``verify`` its header must parse too (no full decode)."""
    if path.is_dir():
        raise DataFormatError(file, f"{path} is a directory, not an image file{hint}", row=row, field=field)
    if not path.is_file():
        raise DataFormatError(file, f"image not found: {path}{hint}", row=row, field=field)
    if verify:
        try:
            with Image.open(path) as im:
                im.verify()
        except UNREADABLE_IMAGE as e:
            raise DataFormatError(file, f"{path}: {describe_unreadable(e)}", row=row, field=field) from None
    return path


def absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


# ----------------------------------------------------------------------------- JSON files
class PairsDict(dict):
    """A JSON object that had duplicate keys: ``pairs`` keeps them all, in file order."""

    pairs: list[tuple[str, Any]]


def _keep_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads silently keeps the last of duplicate keys; a duplicate record id must be reported
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    d = PairsDict(d)
    d.pairs = pairs
    return d


def items_in_order(obj: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """The (key, value) pairs of a parsed JSON object, duplicates included."""
    return obj.pairs if isinstance(obj, PairsDict) else obj.items()


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing, truncated or non-UTF-8 file raises DataFormatError."""
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_keep_duplicates)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} (truncated or corrupted file?)"
        ) from None
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------- the policy
def collect_rows(
    file: Path,
    rows: Iterable[tuple[Row, Any]],
    parse: Callable[[Row, Any], T],
    on_error: str,
    key: Callable[[T], str] | None = None,
    id_field: str | None = None,
) -> tuple[list[T], SkipReport]:
    """Parse every row, raising or skipping malformed ones; duplicate keys and an empty result are errors.

    ``rows`` yields ``(row, raw)``; a raw that is already a DataFormatError (a JSONL line that
    does not parse) is a malformed row like any other.
    """
    check_on_error(on_error)
    report = SkipReport(str(file))
    items: list[T] = []
    seen: dict[str, Row] = {}
    for row, raw in rows:
        try:
            if isinstance(raw, DataFormatError):
                raise raw
            item = parse(row, raw)
            if key is not None:
                k = key(item)
                if k in seen:
                    message = f"duplicate id {k!r} (first seen at row {seen[k]}); expected unique ids"
                    raise DataFormatError(file, message, row=row, field=id_field)
                seen[k] = row
        except DataFormatError as e:
            if on_error == "raise":
                raise
            report.add(e)
            continue
        items.append(item)
    if report.count:
        log.warning(report.summary())
    if not items:
        detail = f"; {report.summary()}" if report.count else ""
        raise DataFormatError(file, f"no valid rows{detail}")
    return items, report

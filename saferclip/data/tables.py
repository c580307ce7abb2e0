"""ViSU-Text-like tables (CSV / JSONL / Parquet, by suffix), HF ``datasets`` folders, and
:func:`load_quadruplets`, which picks the right loader for a path.

ViSU-Text has the columns ``incremental_id, safe, nsfw, coco_id, tag[, prompt_id]`` and no
images (docs/METHOD.md, "Data formats"), so tables load text-only unless image roots are given; they then work
as in :func:`saferclip.data.visu.load_visu_json` (an ``nsfw_im_path`` column enables full mode).

Rows are numbered from 1 in error messages: the n-th data row (CSV: line n+1, after the
header; JSONL: line n).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ._rows import (
    Row,
    absolute,
    check_on_error,
    collect_rows,
    int_field,
    optional_int_field,
)
from .records import DataFormatError, Mode, QuadrupletSet
from .visu import image_roots, load_visu_json, parse_visu_record

TABLE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
VISU_TEXT_COLUMNS = ("incremental_id", "safe", "nsfw", "coco_id", "tag")  # + optional prompt_id


def read_table(path: str | Path) -> tuple[list[str] | None, list[tuple[Row, Any]]]:
    """Read a CSV / JSONL / Parquet table into ``(columns, [(row, record dict)])``.

    ``columns`` is None for JSONL (no header). A file that cannot be parsed as a whole
    (missing, truncated parquet, unterminated CSV quote) raises DataFormatError; a JSONL line
    that does not parse becomes that row's error, so ``on_error="skip"`` can skip it.
    """
    file = Path(path)
    kind = TABLE_SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise DataFormatError(file, f"unknown table format {file.suffix!r}; expected one of {sorted(TABLE_SUFFIXES)}")
    if not file.is_file():
        raise DataFormatError(file, "file not found")
    try:
        if kind == "csv":
            return _read_csv(file)
        if kind == "jsonl":
            return None, _read_jsonl(file)
        return _read_parquet(file)
    except UnicodeDecodeError as e:
        raise DataFormatError(file, f"not UTF-8 text ({e})") from None


def _read_csv(file: Path) -> tuple[list[str], list[tuple[Row, Any]]]:
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter, strict=True)
        rows: list[tuple[Row, Any]] = []
        try:
            for n, rec in enumerate(reader, start=1):
                if None in rec:  # DictReader puts surplus cells under the key None
                    message = f"{len(rec[None])} more cells than the header's {len(reader.fieldnames)} columns"
                    rows.append((n, DataFormatError(file, message, row=n)))
                    continue
                short = [k for k, v in rec.items() if v is None]  # DictReader fills absent cells with None
                if short:
                    n_cols = len(reader.fieldnames)
                    message = f"{n_cols - len(short)} of {n_cols} cells; expected one per column (truncated line?)"
                    rows.append((n, DataFormatError(file, message, row=n, field=short[0])))
                    continue
                rows.append((n, rec))
        except csv.Error as e:
            raise DataFormatError(file, f"invalid CSV near line {reader.line_num}: {e} (truncated file?)") from None
    if not reader.fieldnames:
        raise DataFormatError(file, "empty CSV file; expected a header row")
    return list(reader.fieldnames), rows


def _read_jsonl(file: Path) -> list[tuple[Row, Any]]:
    rows: list[tuple[Row, Any]] = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            message = f"invalid JSON line ({e.msg} at column {e.colno}); expected one object per line"
            rows.append((n, DataFormatError(file, message, row=n)))
            continue
        if not isinstance(rec, dict):
            rec = DataFormatError(file, f"expected a JSON object, got {type(rec).__name__}", row=n)
        rows.append((n, rec))
    return rows


def _read_parquet(file: Path) -> tuple[list[str], list[tuple[Row, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        message = f"cannot read Parquet ({type(e).__name__}: {e}); truncated or not a Parquet file?"
        raise DataFormatError(file, message) from None
    return list(table.column_names), list(enumerate(table.to_pylist(), start=1))


def require_columns(file: Path, columns: Sequence[str] | None, required: Sequence[str]) -> None:
    """A table without a required column is refused as a whole, not row by row."""
    if columns is None:
        return
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataFormatError(
            file,
            f"missing column(s) {', '.join(map(repr, missing))}; "
            f"expected columns {', '.join(required)} (found {', '.join(columns)})",
            field=missing[0],
        )


def load_hf_rows(path: str | Path, split: str | None = None) -> tuple[list[str] | None, list[tuple[Row, Any]]]:
    """Rows of a folder written by HF ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    file = Path(path)
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{file} looks like a Hugging Face `datasets` folder, and reading it needs the `datasets` "
            f"package: pip install \"saferclip[datasets]\" (or convert it to Parquet / CSV / JSONL)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(file))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise DataFormatError(file, f"cannot load with datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, Mapping):  # a DatasetDict (a dict subclass) of splits
        splits = list(ds.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise DataFormatError(file, f"holds splits {splits}; pass split= one of them", field="split")
        ds = ds[split]
    elif split is not None:
        raise DataFormatError(file, f"is a single dataset without splits; got split={split!r}", field="split")
    columns = list(ds.column_names) if hasattr(ds, "column_names") else None
    return columns, [(n, dict(rec)) for n, rec in enumerate(ds, start=1)]


def _quadruplets_from_rows(
    file: Path, columns: list[str] | None, rows: Iterable[tuple[Row, Any]], on_error: str, **image_kw: Any
) -> QuadrupletSet:
    require_columns(file, columns, VISU_TEXT_COLUMNS)
    roots = image_roots(**image_kw)

    def parse(row: Row, rec: Any):
        if not isinstance(rec, Mapping):
            raise DataFormatError(file, f"expected a record object, got {type(rec).__name__}", row=row)
        qid = str(int_field(file, row, rec, "incremental_id", "row id"))
        prompt_id = optional_int_field(file, row, rec, "prompt_id", "prompt id")
        extra = {} if prompt_id is None else {"prompt_id": prompt_id}
        return parse_visu_record(file, row, qid, rec, roots, exclude=("incremental_id", "prompt_id"), extra_meta=extra)

    items, report = collect_rows(file, rows, parse, on_error, key=lambda q: q.id, id_field="incremental_id")
    return QuadrupletSet(items, roots.mode, str(file), report)


def load_visu_table(
    path: str | Path,
    image_root: str | Path | None = None,
    unsafe_image_root: str | Path | None = None,
    split_dir: str | None = None,
    image_ext: str = ".jpg",
    mode: str | Mode = "auto",
    on_error: str = "raise",
    verify_images: bool = False,
) -> QuadrupletSet:
    """Load a ViSU-Text-like table (.csv / .tsv / .jsonl / .parquet). Text-only unless image
    roots are given; ids are ``incremental_id`` (unique); ``prompt_id`` and any other column
    go to ``meta``. Options as in :func:`~saferclip.data.visu.load_visu_json`."""
    check_on_error(on_error)
    file = absolute(path)
    columns, rows = read_table(file)
    return _quadruplets_from_rows(
        file, columns, rows, on_error, mode=mode, image_root=image_root, unsafe_image_root=unsafe_image_root,
        split_dir=split_dir, image_ext=image_ext, verify_images=verify_images,
    )


def load_quadruplets(path: str | Path, split: str | None = None, **kw: Any) -> QuadrupletSet:
    """Load quadruplets from any supported source, chosen by the path.

    ``.json`` -> ViSU JSON; ``.csv/.tsv/.jsonl/.parquet`` -> table; a folder -> HF ``datasets``
    ``save_to_disk`` output (``split`` picks from a DatasetDict; needs ``datasets``). ``kw``
    are the loaders' options (``image_root``, ``unsafe_image_root``, ``split_dir``,
    ``image_ext``, ``mode``, ``on_error``, ``verify_images``).
    """
    file = absolute(path)
    if file.is_dir():
        on_error = kw.pop("on_error", "raise")
        check_on_error(on_error)
        columns, rows = load_hf_rows(file, split)
        return _quadruplets_from_rows(file, columns, rows, on_error, **kw)
    if split is not None:
        raise ValueError(f"split= only applies to a HF datasets folder, not to the file {file}")
    if file.suffix.lower() == ".json":
        return load_visu_json(file, **kw)
    if file.suffix.lower() in TABLE_SUFFIXES:
        return load_visu_table(file, **kw)
    if not file.exists():
        raise DataFormatError(file, "file not found")
    expected = f".json, {', '.join(TABLE_SUFFIXES)} or a HF datasets folder"
    raise DataFormatError(file, f"unknown format {file.suffix!r}; expected {expected}")

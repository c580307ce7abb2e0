"""The records of a ViSU generation: one JSON line per finished caption in
``records/shard-<i>-of-<n>.jsonl``, appended with a single write and fsync, so a killed run
loses at most the caption it was on; a line cut short by the kill is ignored (and counted)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_path

RECORDS_DIR = "records"
_SAFE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


def image_stem(item_id: str) -> str:
    """A file name for an item id: the id itself when it is a plain name, else a hash of it."""
    if _SAFE_STEM.match(item_id):
        return item_id
    return "id-" + hashlib.sha256(item_id.encode()).hexdigest()[:20]


def records_path(out: Path, shard: tuple[int, int]) -> Path:
    return out / RECORDS_DIR / f"shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_records(out_dir: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """Every finished caption's record (by item id) from all shard files, and how many lines
    were ignored (cut short by a killed run: not valid JSON, or without an id)."""
    folder = Path(out_dir) / RECORDS_DIR
    records: dict[str, dict[str, Any]] = {}
    ignored = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                ignored += 1
                continue
            if not isinstance(rec, dict) or "id" not in rec or rec.get("status") not in ("flagged", "unflagged"):
                ignored += 1
                continue
            records[str(rec["id"])] = rec  # a caption redone after a damaged line: the last one holds
    return records, ignored


def drop_damaged_lines(path: Path) -> int:
    """Rewrite this shard's own record file without lines cut short by a killed run (atomically),
    so they are reported once, by the run that redoes their captions. Returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and "id" in rec and rec.get("status") in ("flagged", "unflagged")
        except json.JSONDecodeError:
            ok = False
        if ok:
            kept.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        with atomic_path(path, suffix=".jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return dropped


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """One line, one write, then fsync: a kill leaves at most a cut-short last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: keep it apart from ours
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


__all__ = ["RECORDS_DIR", "append_record", "drop_damaged_lines", "image_stem", "read_records", "records_path"]

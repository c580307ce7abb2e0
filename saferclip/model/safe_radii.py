"""A HySAC checkpoint's safe radii, recorded with the checkpoint they were measured on.

The safe radii (:func:`saferclip.model.hyperbolic.safe_radii`) depend on the weights: each
epoch's towers and head put the safe items at other distances from the origin. So a run
folder's ``safe_radii.json`` keeps one record per checkpoint, keyed by the checksum of that
checkpoint's weights (its ``saferclip_checksum``, :func:`~saferclip.model.checkpoints.
state_dict_checksum`), never by the run folder alone: loading, evaluating or exporting
``last.ckpt`` can never pick up the radii of the best epoch. How a checkpoint was chosen
(best score, a matched operating point, the last epoch) does not matter: the record follows
the weights actually loaded.

File format (``"format": "saferclip-safe-radii"``, ``"version": 2``)::

    {"format": "saferclip-safe-radii", "version": 2,
     "records": [{"checksum": "xxh3_128:…", "checkpoint": "checkpoints/epoch07.ckpt",
                  "epoch": 7, "global_step": 248, "percentile": 95.0, "split": "train",
                  "text": 0.2477, "image": 0.2951, "record_checksum": "xxh3_128:…"}, …]}

``checkpoint`` is the file the radii were measured on, relative to the run folder (None: the
module in memory at the end of training, whose weights a checkpoint may share); ``epoch`` and
``global_step`` are that checkpoint's; ``record_checksum`` is the digest of the record's other
fields (:mod:`saferclip.integrity`): a record edited or damaged since it was written is dropped
with a one-line warning and measured again. A version-1 file (``{"text", "image", "percentile",
"split"}``, written before records named their checkpoint) matches no checkpoint: it is
measured again, with a one-line warning, and replaced by a version-2 file on the next record.

Measuring is :func:`saferclip.evaluation.hyperbolic.checkpoint_radii`; this module only reads
and writes the records (atomically, under a lock: two evaluations of one run may record
together).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import file_lock, write_json_atomic
from ..integrity import digest_bytes
from .checkpoints import CHECKSUM_KEY, CheckpointError, state_dict_checksum

log = logging.getLogger(__name__)

SAFE_RADII_FILE = Path("safe_radii.json")
RADII_FORMAT = "saferclip-safe-radii"
RADII_VERSION = 2


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which weights a record belongs to: the checksum of the weights, the checkpoint file
    (relative to the run folder; None: a module in memory) and its epoch and global step."""

    checksum: str
    checkpoint: str | None = None
    epoch: int | None = None
    global_step: int | None = None

    @classmethod
    def of_checkpoint(cls, ckpt: Mapping[str, Any], run_dir: Path | None) -> CheckpointIdentity:
        """The identity of a checkpoint dict read by :func:`saferclip.model.trained.read_training_checkpoint`."""
        checksum = ckpt.get(CHECKSUM_KEY)
        if not isinstance(checksum, str):  # a checkpoint from before checksums: the same digest, computed here
            checksum = state_dict_checksum(ckpt["state_dict"])
        path = Path(ckpt["_path"])
        name = path.name
        if run_dir is not None:
            try:
                name = path.resolve().relative_to(Path(run_dir).resolve()).as_posix()
            except ValueError:
                pass
        return cls(checksum, name, _int_or_none(ckpt.get("epoch")), _int_or_none(ckpt.get("global_step")))

    def describe(self) -> str:
        """``checkpoints/last.ckpt (epoch 9, step 310)``."""
        where = self.checkpoint or "the module in memory"
        progress = ", ".join(
            f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.global_step)) if v is not None
        )
        return f"{where} ({progress})" if progress else where


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _record_checksum(record: Mapping[str, Any]) -> str:
    fields = {k: v for k, v in record.items() if k != "record_checksum"}
    return digest_bytes(json.dumps(fields, sort_keys=True).encode())


def radii_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SAFE_RADII_FILE


def read_radii_records(run_dir: str | Path | None) -> list[dict[str, Any]]:
    """The records of a run's ``safe_radii.json`` (``[]`` without one; a version-1 file:
    ``[]``, with a one-line warning). An unreadable file or a record with radii that are not
    finite and > 0 is refused with :class:`CheckpointError` naming the file."""
    if run_dir is None:
        return []
    path = radii_path(run_dir)
    if not path.is_file():
        return []
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safe radii ({e}); delete it to have them measured again") from None
    if isinstance(content, Mapping) and content.get("format") != RADII_FORMAT and {"text", "image"} <= set(content):
        log.warning(
            "%s: safe radii from before they were recorded per checkpoint (no checkpoint named): not used; "
            "each checkpoint's are measured again",
            path,
        )
        return []
    records = content.get("records") if isinstance(content, Mapping) else None
    if not isinstance(content, Mapping) or content.get("format") != RADII_FORMAT or not isinstance(records, list):
        raise CheckpointError(
            f"{path}: not a saferclip safe-radii file (expected format {RADII_FORMAT!r} with a list of records); "
            "delete it to have the radii measured again"
        )
    kept = []
    for n, record in enumerate(records):
        try:
            values = [float(record[k]) for k in ("text", "image", "percentile")]
            ok = isinstance(record["checksum"], str) and all(math.isfinite(v) and v > 0 for v in values)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"{path}: record {n} needs a checksum and finite text, image and percentile > 0, got {record!r}; "
                "delete the file to have the radii measured again"
            )
        if record.get("record_checksum") != _record_checksum(record):
            log.warning(
                "%s: record %d (%s) changed since it was written (checksum mismatch): not used, measured again",
                path,
                n,
                record.get("checkpoint"),
            )
            continue
        kept.append(dict(record))
    return kept


def find_radii(run_dir: str | Path | None, identity: CheckpointIdentity, percentile: float) -> dict[str, Any] | None:
    """The record of the weights ``identity`` names at ``percentile`` (None: not measured)."""
    for record in read_radii_records(run_dir):
        if record["checksum"] == identity.checksum and float(record["percentile"]) == float(percentile):
            return dict(record)
    return None


def record_radii(
    run_dir: str | Path,
    identity: CheckpointIdentity,
    radii: Mapping[str, float],
    percentile: float,
    split: str = "train",
) -> dict[str, Any]:
    """Add (or replace) the record of ``identity`` at ``percentile`` in the run's
    ``safe_radii.json``; returns the record."""
    record = {
        "checksum": identity.checksum,
        "checkpoint": identity.checkpoint,
        "epoch": identity.epoch,
        "global_step": identity.global_step,
        "percentile": float(percentile),
        "split": split,
        "text": float(radii["text"]),
        "image": float(radii["image"]),
    }
    record["record_checksum"] = _record_checksum(record)
    run_dir = Path(run_dir)
    with file_lock(run_dir / f".{SAFE_RADII_FILE.name}.lock"):
        try:
            kept = read_radii_records(run_dir)
        except CheckpointError as e:  # a damaged file is replaced by the records measured from now on
            log.warning("%s", e)
            kept = []
        kept = [
            r for r in kept if not (r["checksum"] == identity.checksum and float(r["percentile"]) == float(percentile))
        ]
        write_json_atomic(
            radii_path(run_dir), {"format": RADII_FORMAT, "version": RADII_VERSION, "records": [*kept, record]}
        )
    return record


__all__ = [
    "CheckpointIdentity",
    "RADII_FORMAT",
    "SAFE_RADII_FILE",
    "find_radii",
    "read_radii_records",
    "record_radii",
]

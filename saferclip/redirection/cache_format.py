"""The frozen-embedding cache on disk: one folder per key, its layout, ``meta.json``, and how
it is opened (memory-mapped, every file verified against its checksum).

Layout of one cache folder ``cache_dir/<key>/``: ``safe_text.npy``, ``unsafe_text.npy`` and,
when the set provides them, ``safe_image.npy``, ``unsafe_image.npy`` (all ``[N, D]``),
``extra_safe_text.npy`` ``[E, D]`` + ``extra_safe_captions.json`` for an optional extra safe
caption pool, and ``meta.json``: the identity the key hashes (:mod:`.cache_key`), the counts,
the embedding width, each file's checksum, when and how it was built. A folder that is
incomplete, inconsistent or damaged is never read (:func:`reuse_cache` says so in one line and
the caller rebuilds it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.records import QuadrupletSet
from ..errors import SaferclipError
from ..files import write_json_atomic
from ..integrity import DamagedArtefact, digests, verify_all
from ..model.build import ClipBundle

log = logging.getLogger("saferclip.redirection.cache")

CACHE_FORMAT_VERSION = 1
TEXT_FIELDS = ("safe_text", "unsafe_text")
EXTRA_FIELD = "extra_safe_text"
DTYPES = {"float32": np.float32, "float16": np.float16}  # the stored dtypes, by name


class EmbeddingError(SaferclipError):
    """An embedding that is not finite (NaN / inf): the message names the item and input."""


@dataclass
class EmbeddingCache:
    """Frozen embeddings of one quadruplet set, memory-mapped from ``path``.

    Tensors are ``[N, D]`` (``[E, D]`` for the extra pool) in the stored dtype (float32, or
    float16 when built with ``dtype="float16"``), L2-normalised, row ``i`` = item ``i`` of
    the set. Writing to them changes only this process's copy, never the files.
    """

    safe_text: torch.Tensor  # T0(S) [N, D]
    unsafe_text: torch.Tensor  # T0(U) [N, D]
    safe_image: torch.Tensor | None  # I0(V) [N, D], None when the set has no safe images
    unsafe_image: torch.Tensor | None  # I0(G) [N, D], None when the set has no unsafe images
    key: str
    path: Path
    meta: dict[str, Any]
    was_reused: bool
    extra_safe_text: torch.Tensor | None = None  # T0 of an extra safe caption pool [E, D]
    extra_safe_captions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.safe_text.shape[0]

    @property
    def dim(self) -> int:
        return self.safe_text.shape[1]


def preallocate(folder: Path, shapes: dict[str, list[int]], dtype: str) -> None:
    """Create every field's ``.npy`` (zeros) so that all ranks can open them ``r+``."""
    for name, shape in shapes.items():
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=DTYPES[dtype], shape=tuple(shape))
        out.flush()
        del out


def write_meta(
    tmp: Path,
    identity: dict[str, Any],
    key: str,
    bundle: ClipBundle,
    qset: QuadrupletSet,
    extra: Sequence[str],
    shapes: dict[str, list[int]],
    t0: float,
    world: int,
) -> None:
    if extra:
        (tmp / "extra_safe_captions.json").write_text(json.dumps(list(extra), ensure_ascii=False) + "\n")
    files = [f"{name}.npy" for name in shapes] + (["extra_safe_captions.json"] if extra else [])
    meta = {
        **identity,
        "key": key,
        "model": {**identity["model"], "source": bundle.source},
        "data": {
            **identity["data"],
            "source": qset.source,
            "mode": qset.mode.value,
            "count": len(qset),
            "extra_count": len(extra),
        },
        "embed_dim": next(iter(shapes.values()))[1],
        "counts": {name: shape[0] for name, shape in shapes.items()},
        "checksums": digests(tmp, files),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "built_by_ranks": world,
    }
    write_json_atomic(tmp / "meta.json", meta)


def reuse_cache(final: Path, key: str, quiet: bool = False) -> EmbeddingCache | None:
    """The cache in ``final`` when it is whole (checksums verified), else None: absent, or
    damaged (a one-line warning naming the file, then the caller rebuilds it)."""
    if not final.is_dir():
        return None
    try:
        cache = load_cache(final, expected_key=key)
    except (OSError, ValueError) as e:  # damaged (DamagedArtefact is a ValueError): rebuild rather than trust it
        if not quiet:
            log.warning("%s; rebuilding the frozen-embedding cache %s", " ".join(str(e).split()), final.name)
        return None
    log.info("reusing frozen-embedding cache %s", final)
    return cache


def load_cache(path: str | os.PathLike, expected_key: str | None = None) -> EmbeddingCache:
    """Open a cache folder memory-mapped; raises ValueError when it is incomplete or inconsistent."""
    try:
        return _load_cache(Path(path), expected_key)
    except (KeyError, TypeError, AttributeError) as e:  # a meta.json edited by hand
        raise ValueError(f"{path}: malformed meta.json ({type(e).__name__}: {e})") from None


def _load_cache(path: Path, expected_key: str | None) -> EmbeddingCache:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"{path}: not an embedding cache (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{path}: cache format {meta.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}")
    if expected_key is not None and meta.get("key") != expected_key:
        raise ValueError(f"{path}: holds cache {meta.get('key')!r}, expected {expected_key!r}")
    if "checksums" not in meta:
        raise DamagedArtefact(path, "no checksums recorded (written by an older saferclip)")
    # every file read below, verified against its digest (once per process)
    verify_all(path, meta["checksums"], "embedding cache")
    for name in meta["counts"]:
        if f"{name}.npy" not in meta["checksums"]:
            raise DamagedArtefact(path / f"{name}.npy", "no checksum recorded for it")
    arrays: dict[str, torch.Tensor | None] = {}
    for name, n in meta["counts"].items():
        # mode "c" (copy-on-write): writable for torch, but writes never reach the file
        arr = np.load(path / f"{name}.npy", mmap_mode="c")
        if arr.shape != (n, meta["embed_dim"]) or arr.dtype != DTYPES[meta["dtype"]]:
            raise ValueError(
                f"{path / (name + '.npy')}: shape {arr.shape} {arr.dtype}, meta.json says ({n}, {meta['embed_dim']}) {meta['dtype']}"
            )
        arrays[name] = torch.from_numpy(arr)
    for name in TEXT_FIELDS:
        if name not in arrays:
            raise ValueError(f"{path}: {name}.npy missing")
    extra_captions: list[str] = []
    if EXTRA_FIELD in arrays:
        extra_captions = json.loads((path / "extra_safe_captions.json").read_text())
        if len(extra_captions) != meta["counts"][EXTRA_FIELD]:
            raise ValueError(f"{path}: extra_safe_captions.json does not match {EXTRA_FIELD}.npy")
    return EmbeddingCache(
        safe_text=arrays["safe_text"],
        unsafe_text=arrays["unsafe_text"],
        safe_image=arrays.get("safe_image"),
        unsafe_image=arrays.get("unsafe_image"),
        key=meta["key"],
        path=path,
        meta=meta,
        was_reused=True,
        extra_safe_text=arrays.get(EXTRA_FIELD),
        extra_safe_captions=extra_captions,
    )

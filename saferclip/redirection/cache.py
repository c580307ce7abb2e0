"""The frozen-embedding cache: ``T0(S)``, ``T0(U)``, ``I0(V)``, ``I0(G)`` computed once (docs/METHOD.md, "Finding the targets").

Training never runs the frozen encoders: every frozen target is read from this cache, so the
targets cannot drift. The cache lives in ``cache_dir/<key>/`` where ``key`` hashes

- the model: architecture and :func:`saferclip.model.build.weights_fingerprint` (every weight byte),
  plus the dtype the weights run in;
- the data: captions in order, image paths in order, and each image file's size and
  modification time (``image_fingerprint="stat"``, the default). Reading the pixels of a
  100k-image set on every run would cost as much as a good part of the embedding itself;
  size + mtime catches every ordinary edit, copy or regeneration. What it misses is an
  in-place rewrite that keeps the byte count and resets the mtime (``cp -p``, ``touch -r``):
  ``image_fingerprint="content"`` hashes the bytes instead, for users who do that;
- the preprocessing (``repr`` of the transform) and tokenizer (type and context length);
- the storage dtype and the cache format version.

Same key, same embeddings: a later call loads the arrays memory-mapped (``was_reused``).
Any change gives a new key and a new build; nothing is ever read from a stale cache. A build
writes into a hidden temporary folder and renames it into place only when complete, so a
crash mid-write leaves every earlier cache as it was.

Layout of one cache folder: ``safe_text.npy``, ``unsafe_text.npy`` and, when the set
provides them, ``safe_image.npy``, ``unsafe_image.npy`` (all ``[N, D]``), ``extra_safe_text.npy``
``[E, D]`` + ``extra_safe_captions.json`` for an optional extra safe caption pool, and
``meta.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..console import show_progress
from ..data.images import ImageFiles, load_image
from ..data.records import DataFormatError, QuadrupletSet
from ..errors import ConfigError, SaferclipError
from ..files import atomic_folder, file_lock, remove_leftovers, write_json_atomic
from ..integrity import DamagedArtefact, digests, verify_all
from ..model.build import ClipBundle, encode_tokens, eval_mode, weights_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
KEY_LENGTH = 24  # hex characters of the SHA-256 key used as the folder name
TEXT_FIELDS = ("safe_text", "unsafe_text")
EXTRA_FIELD = "extra_safe_text"
_DTYPES = {"float32": np.float32, "float16": np.float16}


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


# ----------------------------------------------------------------------------- fingerprints
def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe_preprocess(preprocess: Callable) -> str:
    """``repr`` of the image transform, without memory addresses (they change every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


def describe_tokenizer(tokenizer: Callable) -> str:
    parts = [f"{type(tokenizer).__module__}.{type(tokenizer).__name__}"]
    for attr in ("context_length", "tokenizer_name", "vocab_size"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (int, str)):
            parts.append(f"{attr}={value}")
    return " ".join(parts)


def _image_paths(qset: QuadrupletSet) -> dict[str, list[Path]]:
    """The image files the set's mode provides, per field; a missing path is an error naming the item."""
    out: dict[str, list[Path]] = {}
    wanted = [("safe_image", qset.mode.has_safe_images), ("unsafe_image", qset.mode.has_unsafe_images)]
    for name, present in wanted:
        if not present:
            continue
        paths = []
        for row, q in enumerate(qset.items):
            p = getattr(q, name)
            if p is None:
                raise DataFormatError(
                    qset.source,
                    f"mode {qset.mode.value!r} needs a {name.replace('_', ' ')}, item has none",
                    row=f"{row} (id {q.id})",
                    field=name,
                )
            paths.append(Path(p))
        out[name] = paths
    return out


def data_fingerprint(
    qset: QuadrupletSet, extra_safe_captions: Sequence[str] = (), image_fingerprint: str = "stat"
) -> str:
    """SHA-256 over captions, image paths and image file identity (size + mtime, or bytes).

    Item ids and the set's source name are left out: the cache is positional (row ``i`` is
    item ``i``) and only what is embedded decides its content.
    """
    if image_fingerprint not in ("stat", "content"):
        raise ConfigError(f"image_fingerprint must be 'stat' or 'content', got {image_fingerprint!r}")
    h = hashlib.sha256()
    h.update(
        f"mode={qset.mode.value};n={len(qset)};extra={len(extra_safe_captions)};img={image_fingerprint}\n".encode()
    )
    for texts in (qset.safe_captions, qset.unsafe_captions, list(extra_safe_captions)):
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must differ
        h.update(b"\1")
    for name, paths in _image_paths(qset).items():
        for row, p in enumerate(paths):
            try:
                st = p.stat()
            except OSError:
                q = qset.items[row]
                raise DataFormatError(p, f"image file not found (item {row}, id {q.id}, {name})") from None
            h.update(f"{p}\0{st.st_size}\0".encode())
            if image_fingerprint == "stat":
                h.update(f"{st.st_mtime_ns}\0".encode())
            else:
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_identity(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    extra_safe_captions: Sequence[str] = (),
    dtype: str = "float32",
    image_fingerprint: str = "stat",
) -> dict[str, Any]:
    """Everything that decides the cache's content; its hash is the cache key."""
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    param = next(bundle.model.parameters())
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": {
            "arch": bundle.arch,
            "weights_fingerprint": weights_fingerprint(bundle.model),
            "dtype": str(param.dtype),
        },
        "data": {
            "fingerprint": data_fingerprint(qset, extra_safe_captions, image_fingerprint),
            "image_fingerprint": image_fingerprint,
        },
        "preprocess": describe_preprocess(bundle.preprocess),
        "tokenizer": describe_tokenizer(bundle.tokenizer),
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------- encoding
def _check_finite(emb: torch.Tensor, start: int, what: str, ids: Sequence[str]) -> None:
    bad = ~torch.isfinite(emb).all(dim=1)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten() + start).tolist()
        names = ", ".join(f"item {r} (id {ids[r]})" for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise EmbeddingError(
            f"non-finite (NaN/inf) {what} embedding for {names}{more}; check the model weights and inputs"
        )


def _text_batches(
    bundle: ClipBundle, texts: Sequence[str], batch_size: int, device
) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[start : start + batch_size])).to(device)
        yield start, encode_tokens(bundle.model, tokens).float().cpu()


def _image_batches(
    bundle: ClipBundle, paths: list[Path], ids: list[str], name: str, batch_size: int, num_workers: int, device, dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    loader = DataLoader(
        ImageFiles(paths, bundle.preprocess, ids, name),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )
    start = 0
    for images in loader:
        x = images.to(device=device, dtype=dtype, non_blocking=True)
        yield start, bundle.model.encode_image(x, normalize=True).float().cpu()
        start += len(images)


def _embed_jobs(
    bundle: ClipBundle, qset: QuadrupletSet, extra: Sequence[str], batch_size: int, num_workers: int
) -> list[tuple[str, int, Callable[[int, int], Iterator[tuple[int, torch.Tensor]]], Sequence[str]]]:
    """One job per cached field: ``(name, rows, batches(lo, hi), item names)``; ``batches``
    embeds rows ``lo:hi`` and yields ``(row, [b, D])`` with absolute row numbers."""
    param = next(bundle.model.parameters())
    ids = [q.id for q in qset.items]

    def texts(captions: Sequence[str]) -> Callable[[int, int], Iterator[tuple[int, torch.Tensor]]]:
        def batches(lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
            for start, emb in _text_batches(bundle, captions[lo:hi], batch_size, param.device):
                yield lo + start, emb

        return batches

    def images(paths: list[Path], name: str) -> Callable[[int, int], Iterator[tuple[int, torch.Tensor]]]:
        def batches(lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
            shard = _image_batches(bundle, paths[lo:hi], ids[lo:hi], name, batch_size, num_workers, param.device, param.dtype)
            for start, emb in shard:
                yield lo + start, emb

        return batches

    jobs = [
        ("safe_text", len(qset), texts(qset.safe_captions), ids),
        ("unsafe_text", len(qset), texts(qset.unsafe_captions), ids),
    ]
    for name, paths in _image_paths(qset).items():
        jobs.append((name, len(paths), images(paths, name), ids))
    if extra:
        jobs.append((EXTRA_FIELD, len(extra), texts(extra), [f"extra-{i}" for i in range(len(extra))]))
    return jobs


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows ``[lo, hi)`` of ``n`` that ``rank`` of ``world`` embeds (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def _embed_into(
    folder: Path,
    bundle: ClipBundle,
    qset: QuadrupletSet,
    extra: Sequence[str],
    dtype: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    rank: int = 0,
    world: int = 1,
    create: bool = True,
) -> dict[str, list[int]]:
    """Run the frozen encoders, writing each field straight into a ``.npy`` memmap under ``folder``.

    With ``world > 1`` this process embeds only its shard (:func:`shard_rows`) of every field
    into memmaps that rank 0 created beforehand (``create=False``: opened ``r+``, shared, so
    every rank's rows land in the same files)."""
    dim = _dim(bundle)
    jobs = _embed_jobs(bundle, qset, extra, batch_size, num_workers)
    shapes: dict[str, list[int]] = {}
    total = sum(hi - lo for lo, hi in (shard_rows(n, rank, world) for _, n, _, _ in jobs))
    with (
        eval_mode(bundle.model),
        torch.inference_mode(),
        tqdm(total=total, disable=not show_progress(progress), unit="item", desc="frozen embeddings", dynamic_ncols=True) as bar,
    ):
        for name, n, batches, names in jobs:
            bar.set_postfix_str(name)
            if create:
                out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=_DTYPES[dtype], shape=(n, dim))
            else:
                out = np.load(folder / f"{name}.npy", mmap_mode="r+")
            if out.shape != (n, dim):
                raise EmbeddingError(f"{name}: the shared cache file is {out.shape}, expected {(n, dim)}")
            what = name.replace("_", " ")
            lo, hi = shard_rows(n, rank, world)
            for start, emb in batches(lo, hi):
                if emb.shape[1] != dim:
                    raise EmbeddingError(f"{what}: the model returned {emb.shape[1]}-d embeddings, expected {dim}")
                _check_finite(emb, start, what, names)
                out[start : start + len(emb)] = emb.numpy()
                bar.update(len(emb))
            out.flush()
            del out  # close the memmap before the folder is renamed
            shapes[name] = [n, dim]
    return shapes


def _preallocate(folder: Path, shapes: dict[str, list[int]], dtype: str) -> None:
    """Create every field's ``.npy`` (zeros) so that all ranks can open them ``r+``."""
    for name, shape in shapes.items():
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=_DTYPES[dtype], shape=tuple(shape))
        out.flush()
        del out


def _probe_dim(bundle: ClipBundle, device) -> int:
    with torch.inference_mode():
        return int(bundle.model.encode_text(bundle.tokenizer(["a"]).to(device)).shape[-1])


# ----------------------------------------------------------------------------- build / load
def build_or_load_cache(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    cache_dir: str | os.PathLike,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    dtype: str = "float32",
    extra_safe_captions: Sequence[str] | None = None,
    image_fingerprint: str = "stat",
    distributed: bool = True,
) -> EmbeddingCache:
    """Embed ``qset`` with the frozen encoders of ``bundle``, or load the cache that already holds it.

    Under an initialised ``torch.distributed`` process group of more than one rank (and
    ``distributed``), every rank must call this together: each embeds its contiguous shard of
    every field (:func:`shard_rows`) into the same memory-mapped files, and rank 0 checksums
    and publishes the folder. ``cache_dir`` must then be one folder all ranks see (a shared
    filesystem across nodes). The result is the one-process cache (same key, same rows).

    Args:
        bundle: the *original* model (its weights are fingerprinted; the model is not changed).
        qset: the set; captions always, safe / unsafe images where ``qset.mode`` provides them.
        cache_dir: parent folder; the cache is ``cache_dir/<key>/``.
        batch_size, num_workers: encoder batch size; image DataLoader workers.
        dtype: ``"float32"`` or ``"float16"`` (half the disk and memory; ~1e-3 error).
        extra_safe_captions: an extra safe caption pool (see :func:`saferclip.data.safe_corpus.load_safe_corpus`),
            embedded with the same model into ``extra_safe_text [E, D]``.
        image_fingerprint: ``"stat"`` (size + mtime, cheap) or ``"content"`` (hash the bytes).
        distributed: ``False`` builds in this process alone even inside a process group.

    Raises:
        DataFormatError: an image missing or unreadable (naming the file and item).
        EmbeddingError: a NaN / inf embedding (naming the item).
    """
    if len(qset) == 0:
        raise ConfigError(f"{qset.source}: the quadruplet set is empty, nothing to embed")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    extra = list(extra_safe_captions or [])
    identity = cache_identity(bundle, qset, extra, dtype, image_fingerprint)
    key = _sha256_json(identity)[:KEY_LENGTH]
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    rank, world = _process_group() if distributed else (0, 1)
    if world > 1:
        args = (bundle, qset, extra, dtype, batch_size, num_workers, progress)
        return _build_sharded(final, key, identity, rank, world, *args)
    cache = _reuse(final, key)
    if cache is not None:
        return cache
    # one build per key: a second process sharing the folder waits here, then reuses the result
    with file_lock(cache_dir / f".{key}.lock"):
        cache = _reuse(final, key, quiet=True)
        if cache is not None:
            return cache
        remove_leftovers(final)  # of a build killed earlier
        # a damaged folder of the same key is replaced
        with atomic_folder(final, replace=True) as tmp:
            t0 = time.perf_counter()
            shapes = _embed_into(tmp, bundle, qset, extra, dtype, batch_size, num_workers, progress)
            _write_meta(tmp, identity, key, bundle, qset, extra, shapes, t0, world=1)
        cache = load_cache(final, expected_key=key)
    cache.was_reused = False
    return cache


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_ranks(value: Any) -> list[Any]:
    """``value`` of every rank (a collective: every rank calls it)."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _raise_if_failed(errors: list[str | None], rank: int, own: BaseException | None) -> None:
    """After a collective step: re-raise this rank's error, or name another rank's. So one
    rank's bad image stops every rank with a one-line error instead of a hang."""
    if own is not None:
        raise own
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise EmbeddingError(f"the frozen-embedding cache build failed on rank {r}: {e}")


def _build_sharded(
    final: Path,
    key: str,
    identity: dict[str, Any],
    rank: int,
    world: int,
    bundle: ClipBundle,
    qset: QuadrupletSet,
    extra: list[str],
    dtype: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> EmbeddingCache:
    """Every rank embeds its shard into rank 0's temporary folder; rank 0 publishes it.

    Rank 0 alone holds the key's file lock and the atomic folder, so a crash anywhere leaves
    no half-written cache and a second job sharing ``cache_dir`` waits, as for one process."""
    keys = _all_ranks(key)
    if len(set(keys)) != 1:
        raise ConfigError(
            f"the ranks disagree on the frozen-embedding cache key ({keys}): every rank must load the "
            "same model weights and the same data"
        )
    if rank != 0:
        tmp_name = _all_ranks(None)[0]
        if tmp_name is not None:  # rank 0 is building: embed this rank's shard into its folder
            error = None
            try:
                _embed_into(Path(tmp_name), bundle, qset, extra, dtype, batch_size, num_workers, False, rank, world, create=False)
            except Exception as e:  # reported to every rank below, raised here
                error = e
            _raise_if_failed(_all_ranks(None if error is None else str(error)), rank, error)
        done = _all_ranks(None)[0]  # rank 0: "ok" once the folder is published, else its error
        if done != "ok":
            raise EmbeddingError(f"the frozen-embedding cache build failed on rank 0: {done}")
        cache = load_cache(final, expected_key=key)
        cache.was_reused = tmp_name is None
        return cache
    # rank 0. The collectives, in the same order on every rank: the temporary folder's name
    # (None: nothing to build), then each rank's error (only when building), then "ok" or
    # rank 0's error (the others wait for it unless a rank's error already stopped them all).
    sent_folder, others_wait = False, True
    try:
        with contextlib.ExitStack() as stack:
            cache = _reuse(final, key)
            if cache is None:
                stack.enter_context(file_lock(final.parent / f".{key}.lock"))
                cache = _reuse(final, key, quiet=True)
            if cache is not None:
                _all_ranks(None)  # nothing to build
                sent_folder, others_wait = True, False
                _all_ranks("ok")
                return cache
            remove_leftovers(final)
            tmp = stack.enter_context(atomic_folder(final, replace=True))
            t0 = time.perf_counter()
            jobs = _embed_jobs(bundle, qset, extra, batch_size, num_workers)
            shapes = {name: [n, _dim(bundle)] for name, n, _, _ in jobs}
            _preallocate(tmp, shapes, dtype)
            _all_ranks(str(tmp))
            sent_folder = True
            error = None
            try:
                _embed_into(tmp, bundle, qset, extra, dtype, batch_size, num_workers, progress, 0, world, create=False)
            except Exception as e:
                error = e
            errors = _all_ranks(None if error is None else str(error))
            others_wait = all(e is None for e in errors)
            _raise_if_failed(errors, 0, error)  # every rank raises when one failed
            _write_meta(tmp, identity, key, bundle, qset, extra, shapes, t0, world=world)
        # leaving the block published the folder and released the lock
    except Exception as e:  # tell the others before raising, so that they do not wait forever
        if not sent_folder:
            _all_ranks(None)
        if others_wait:
            _all_ranks(f"{type(e).__name__}: {e}")
        raise
    _all_ranks("ok")
    cache = load_cache(final, expected_key=key)
    cache.was_reused = False
    return cache


def _dim(bundle: ClipBundle) -> int:
    param = next(bundle.model.parameters())
    return int(bundle.model_cfg.get("embed_dim") or 0) or _probe_dim(bundle, param.device)


def _write_meta(
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


def _reuse(final: Path, key: str, quiet: bool = False) -> EmbeddingCache | None:
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
        if arr.shape != (n, meta["embed_dim"]) or arr.dtype != _DTYPES[meta["dtype"]]:
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


# ----------------------------------------------------------------------------- reference path
@torch.no_grad()
def embed_plain(bundle: ClipBundle, qset: QuadrupletSet, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The plain batched open_clip loop: no cache, no DataLoader, no checks.

    The reference the cache builder is compared with (``scripts/bench_embedding_cache.py``)
    and tested against. Returns float32 ``[N, D]`` tensors keyed like the cache's fields.
    """
    from ..model.build import encode_images, encode_text

    out = {
        "safe_text": encode_text(bundle, qset.safe_captions, batch_size),
        "unsafe_text": encode_text(bundle, qset.unsafe_captions, batch_size),
    }
    for name, paths in _image_paths(qset).items():
        parts = []
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([bundle.preprocess(load_image(p)) for p in paths[start : start + batch_size]])
            parts.append(encode_images(bundle, batch, batch_size))
        out[name] = torch.cat(parts)
    return out

"""The frozen-embedding cache: ``T0(S)``, ``T0(U)``, ``I0(V)``, ``I0(G)`` computed once (docs/METHOD.md, "Finding the targets").

Training never runs the frozen encoders: every frozen target is read from this cache, so the
targets cannot drift. :func:`build_or_load_cache` embeds a set with the frozen encoders, or
loads the cache that already holds it. The cache lives in ``cache_dir/<key>/``:

* :mod:`.cache_key` — what the key hashes (the model's every weight byte, the data, the
  preprocessing and tokenizer, the storage dtype, the format version);
* :mod:`.cache_format` — the folder's layout and ``meta.json``, :class:`EmbeddingCache` and
  :func:`load_cache` (memory-mapped, checksums verified);
* :mod:`.cache_ddp` — the build shared by the ranks of a process group;
* this module — the embedding loop (straight into memory-mapped ``.npy`` files, every row
  checked finite) and the build itself.

Same key, same embeddings: a later call loads the arrays memory-mapped (``was_reused``).
A build writes into a hidden temporary folder and renames it into place only when complete,
so a crash mid-write leaves every earlier cache as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..console import show_progress
from ..data.images import ImageFiles, load_image
from ..data.records import QuadrupletSet
from ..errors import ConfigError
from ..files import atomic_folder, file_lock, remove_leftovers
from ..model.build import ClipBundle, encode_tokens, eval_mode
from .cache_ddp import build_sharded, process_group, shard_rows
from .cache_format import DTYPES, EXTRA_FIELD, EmbeddingCache, EmbeddingError, load_cache, reuse_cache, write_meta
from .cache_key import cache_identity, cache_key, image_paths

__all__ = ["EmbeddingCache", "EmbeddingError", "build_or_load_cache", "embed_plain", "load_cache"]


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
            shard = _image_batches(
                bundle, paths[lo:hi], ids[lo:hi], name, batch_size, num_workers, param.device, param.dtype
            )
            for start, emb in shard:
                yield lo + start, emb

        return batches

    jobs = [
        ("safe_text", len(qset), texts(qset.safe_captions), ids),
        ("unsafe_text", len(qset), texts(qset.unsafe_captions), ids),
    ]
    for name, paths in image_paths(qset).items():
        jobs.append((name, len(paths), images(paths, name), ids))
    if extra:
        jobs.append((EXTRA_FIELD, len(extra), texts(extra), [f"extra-{i}" for i in range(len(extra))]))
    return jobs


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
        tqdm(
            total=total, disable=not show_progress(progress), unit="item", desc="frozen embeddings", dynamic_ncols=True
        ) as bar,
    ):
        for name, n, batches, names in jobs:
            bar.set_postfix_str(name)
            if create:
                out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=DTYPES[dtype], shape=(n, dim))
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


def _probe_dim(bundle: ClipBundle, device) -> int:
    with torch.inference_mode():
        return int(bundle.model.encode_text(bundle.tokenizer(["a"]).to(device)).shape[-1])


def _dim(bundle: ClipBundle) -> int:
    param = next(bundle.model.parameters())
    return int(bundle.model_cfg.get("embed_dim") or 0) or _probe_dim(bundle, param.device)


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
    key = cache_key(identity)
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    rank, world = process_group() if distributed else (0, 1)
    if world > 1:
        return build_sharded(
            final,
            key,
            rank,
            world,
            dtype,
            plan=lambda: {
                name: [n, _dim(bundle)] for name, n, _, _ in _embed_jobs(bundle, qset, extra, batch_size, num_workers)
            },
            embed=lambda folder: _embed_into(
                folder,
                bundle,
                qset,
                extra,
                dtype,
                batch_size,
                num_workers,
                progress if rank == 0 else False,
                rank,
                world,
                create=False,
            ),
            finish=lambda folder, shapes, t0: write_meta(
                folder, identity, key, bundle, qset, extra, shapes, t0, world=world
            ),
        )
    cache = reuse_cache(final, key)
    if cache is not None:
        return cache
    # one build per key: a second process sharing the folder waits here, then reuses the result
    with file_lock(cache_dir / f".{key}.lock"):
        cache = reuse_cache(final, key, quiet=True)
        if cache is not None:
            return cache
        remove_leftovers(final)  # of a build killed earlier
        # a damaged folder of the same key is replaced
        with atomic_folder(final, replace=True) as tmp:
            t0 = time.perf_counter()
            shapes = _embed_into(tmp, bundle, qset, extra, dtype, batch_size, num_workers, progress)
            write_meta(tmp, identity, key, bundle, qset, extra, shapes, t0, world=1)
        cache = load_cache(final, expected_key=key)
    cache.was_reused = False
    return cache


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
    for name, paths in image_paths(qset).items():
        parts = []
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([bundle.preprocess(load_image(p)) for p in paths[start : start + batch_size]])
            parts.append(encode_images(bundle, batch, batch_size))
        out[name] = torch.cat(parts)
    return out

"""The frozen-embedding cache built by every rank of a ``torch.distributed`` process group.

Each rank embeds its contiguous shard of every field (:func:`shard_rows`) into the same
memory-mapped files, which rank 0 preallocated in its temporary folder; rank 0 alone holds
the key's file lock and the atomic folder, checksums the result and publishes it. So a crash
anywhere leaves no half-written cache, and a second job sharing ``cache_dir`` waits, as for
one process. One rank's error (a bad image) stops every rank with a one-line error naming
the rank, instead of a hang. What is embedded is the caller's (:mod:`.cache`): this module
only runs the protocol between the ranks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..files import atomic_folder, file_lock, remove_leftovers
from .cache_format import EmbeddingCache, EmbeddingError, load_cache, preallocate, reuse_cache


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows ``[lo, hi)`` of ``n`` that ``rank`` of ``world`` embeds (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_ranks(value: Any) -> list[Any]:
    """``value`` of every rank (a collective: every rank calls it)."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def raise_if_failed(errors: list[str | None], rank: int, own: BaseException | None) -> None:
    """After a collective step: re-raise this rank's error, or name another rank's. So one
    rank's bad image stops every rank with a one-line error instead of a hang."""
    if own is not None:
        raise own
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise EmbeddingError(f"the frozen-embedding cache build failed on rank {r}: {e}")


def build_sharded(
    final: Path,
    key: str,
    rank: int,
    world: int,
    dtype: str,
    plan: Callable[[], dict[str, list[int]]],
    embed: Callable[[Path], None],
    finish: Callable[[Path, dict[str, list[int]], float], None],
) -> EmbeddingCache:
    """Every rank embeds its shard into rank 0's temporary folder; rank 0 publishes it.

    Every rank calls this together, with the same ``key``. ``plan()`` gives each field's shape
    (rank 0, when it builds); ``embed(folder)`` embeds this rank's shard of every field into
    the preallocated ``.npy`` files of ``folder``; ``finish(folder, shapes, t0)`` writes the
    folder's ``meta.json`` (rank 0, once every rank succeeded)."""
    keys = all_ranks(key)
    if len(set(keys)) != 1:
        raise ConfigError(
            f"the ranks disagree on the frozen-embedding cache key ({keys}): every rank must load the "
            "same model weights and the same data"
        )
    if rank != 0:
        tmp_name = all_ranks(None)[0]
        if tmp_name is not None:  # rank 0 is building: embed this rank's shard into its folder
            error = None
            try:
                embed(Path(tmp_name))
            except Exception as e:  # reported to every rank below, raised here
                error = e
            raise_if_failed(all_ranks(None if error is None else str(error)), rank, error)
        done = all_ranks(None)[0]  # rank 0: "ok" once the folder is published, else its error
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
            cache = reuse_cache(final, key)
            if cache is None:
                stack.enter_context(file_lock(final.parent / f".{key}.lock"))
                cache = reuse_cache(final, key, quiet=True)
            if cache is not None:
                all_ranks(None)  # nothing to build
                sent_folder, others_wait = True, False
                all_ranks("ok")
                return cache
            remove_leftovers(final)
            tmp = stack.enter_context(atomic_folder(final, replace=True))
            t0 = time.perf_counter()
            shapes = plan()
            preallocate(tmp, shapes, dtype)
            all_ranks(str(tmp))
            sent_folder = True
            error = None
            try:
                embed(tmp)
            except Exception as e:
                error = e
            errors = all_ranks(None if error is None else str(error))
            others_wait = all(e is None for e in errors)
            raise_if_failed(errors, 0, error)  # every rank raises when one failed
            finish(tmp, shapes, t0)
        # leaving the block published the folder and released the lock
    except Exception as e:  # tell the others before raising, so that they do not wait forever
        if not sent_folder:
            all_ranks(None)
        if others_wait:
            all_ranks(f"{type(e).__name__}: {e}")
        raise
    all_ranks("ok")
    cache = load_cache(final, expected_key=key)
    cache.was_reused = False
    return cache

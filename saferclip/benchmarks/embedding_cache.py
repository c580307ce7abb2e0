"""The frozen-embedding cache builder measured against the plain batched open_clip loop
(``scripts/bench_embedding_cache.py`` prints it, ``scripts/gpu_check.py`` times it on a GPU).

Both embed the same quadruplets with the same model and batch size: the plain loop is
:func:`saferclip.redirection.cache.embed_plain` (tokenize / preprocess, encode, concatenate;
no fingerprints, no files, no checks); the builder adds the model and data fingerprints, the
NaN check, the DataLoader and the atomic ``.npy`` writes. :func:`compare` times both and
gives plain time / builder time (1.0 = no overhead; target >= 0.95).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..data.records import Mode, Quadruplet, QuadrupletSet
from ..redirection.cache import build_or_load_cache, embed_plain


def toy_quadruplets(world: Path, mode: Mode, limit: int) -> QuadrupletSet:
    """The toy world's ViSU training split as quadruplets (paths resolved like the ViSU loader does)."""
    records = json.loads((world / "visu" / "train.json").read_text())["data"]
    items = [
        Quadruplet(
            id=key,
            safe_caption=r["safe"],
            unsafe_caption=r["nsfw"],
            safe_image=world / "visu" / "train2017" / f"{r['coco_id']:012d}.png" if mode.has_safe_images else None,
            unsafe_image=world / "visu" / r["nsfw_im_path"] if mode.has_unsafe_images else None,
            tag=r["tag"],
        )
        for key, r in list(records.items())[:limit]
    ]
    return QuadrupletSet(items, mode, str(world / "visu" / "train.json"))


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(
    name: str, bundle, qset: QuadrupletSet, batch_size: int, repeats: int, workdir: Path, num_workers: int = 0
) -> dict:
    """Time the plain loop and the cache builder (``num_workers`` image DataLoader workers) on
    ``qset``, print one row and return its figures: ``items``, ``inputs``, ``plain_s``,
    ``cache_s`` (best wall times), ``inputs_per_s`` (the builder's), ``ratio`` (plain /
    builder wall time; target >= 0.95), ``cpu_ratio``, ``reuse_s``, ``max_diff``."""
    n_inputs = 2 * len(qset) + len(qset) * (qset.mode.has_safe_images + qset.mode.has_unsafe_images)
    plain_t, cache_t = [], []  # (wall, cpu) per repeat
    for r in range(repeats):
        # interleaved and alternating in order, best of: the machine is shared, so the minimum
        # is the least disturbed run of each; CPU time is reported too, as it is less
        # sensitive to being descheduled than wall time
        run_plain = lambda: embed_plain(bundle, qset, batch_size)  # noqa: E731
        run_cache = lambda r=r: build_or_load_cache(  # noqa: E731
            bundle, qset, workdir / f"{name}-{r}", batch_size=batch_size, num_workers=num_workers, progress=False
        )
        for which in ("plain", "cache") if r % 2 == 0 else ("cache", "plain"):
            wall, cpu, out = timed(run_plain if which == "plain" else run_cache)
            if which == "plain":
                plain_t.append((wall, cpu))
                reference = out
            else:
                cache_t.append((wall, cpu))
                cache = out
                assert not cache.was_reused
    reuse_s, _, reused = timed(
        lambda: build_or_load_cache(bundle, qset, workdir / f"{name}-0", batch_size=batch_size, progress=False)
    )
    assert reused.was_reused
    diff = max((getattr(cache, k).float() - v).abs().max().item() for k, v in reference.items())
    plain, built = min(w for w, _ in plain_t), min(w for w, _ in cache_t)
    plain_cpu, built_cpu = min(c for _, c in plain_t), min(c for _, c in cache_t)
    print(
        f"{name:<28} {len(qset):>6} {n_inputs:>7} {plain:>9.2f} {built:>9.2f} {n_inputs / built:>9.0f}"
        f" {plain / built:>7.3f} {plain_cpu / built_cpu:>7.3f} {reuse_s:>8.2f} {diff:>9.1e}",
        flush=True,
    )
    return {
        "items": len(qset),
        "inputs": n_inputs,
        "plain_s": plain,
        "cache_s": built,
        "inputs_per_s": n_inputs / built,
        "ratio": plain / built,
        "cpu_ratio": plain_cpu / built_cpu,
        "reuse_s": reuse_s,
        "max_diff": diff,
        "num_workers": num_workers,
    }


HEADER = (
    f"{'case':<28} {'items':>6} {'inputs':>7} {'plain s':>9} {'cache s':>9} {'inputs/s':>9} {'ratio':>7} "
    f"{'cpu rat':>7} {'reuse s':>8} {'max diff':>9}"
)

"""What ``saferclip-index`` reports about a set of safe neighbours, and the toy-world check.

:func:`summarize` gathers pool size, neighbour similarity statistics, a text difficulty
histogram, example redirections, the share of unsafe captions not sent to their own pair,
guard counts and timings into a dict; :func:`format_summary` renders it as text.
:func:`attribute_agreement` uses the toy world's known scenes to say how often the chosen
neighbour keeps what the unsafe item shows (docs/METHOD.md, "The toy world").
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..data.records import QuadrupletSet
from .cache_format import EmbeddingCache
from .faiss_search import NeighbourError
from .neighbours import SafeNeighbours, pool_text

SCENE_ATTRIBUTES = ("shape", "colour", "size", "background")


def pool_caption(qset: QuadrupletSet, cache: EmbeddingCache, position: int) -> str:
    """The safe caption at a pool position (the set's, then the extra pool's)."""
    n = len(qset)
    return qset[position].safe_caption if position < n else cache.extra_safe_captions[position - n]


def attribute_agreement(qset: QuadrupletSet, neighbours: SafeNeighbours, own_pair: bool = False) -> dict[str, float]:
    """Toy world: how often the top neighbour's safe scene keeps the unsafe scene's attributes.

    Reads ``meta["nsfw_scene"]`` of item ``i`` and ``meta["safe_scene"]`` of its top-1
    neighbour (or, with ``own_pair``, of item ``i`` itself: the rigid Safe-CLIP target, for
    comparison). Returns the share per attribute (shape, colour, size, background), ``all``
    (all four kept), ``n`` (items counted) and ``extra`` (items whose neighbour is an extra
    caption, without a known scene, left out).
    """
    if len(qset) != neighbours.n_set:
        raise NeighbourError(f"the set has {len(qset)} items, the neighbours were found for {neighbours.n_set}")
    top = neighbours.indices[:, 0].tolist()
    hits = {a: 0 for a in SCENE_ATTRIBUTES}
    both = counted = extra = 0
    for i, j in enumerate(top):
        j = i if own_pair else j
        if j >= len(qset):
            extra += 1
            continue
        unsafe, safe = qset[i].meta.get("nsfw_scene"), qset[j].meta.get("safe_scene")
        if not isinstance(unsafe, dict) or not isinstance(safe, dict):
            missing = "nsfw_scene" if not isinstance(unsafe, dict) else "safe_scene"
            raise NeighbourError(
                f"{qset.source}: item {i if missing == 'nsfw_scene' else j} has no meta[{missing!r}] (a toy-world set is needed)"
            )
        same = [unsafe.get(a) == safe.get(a) for a in SCENE_ATTRIBUTES]
        for a, s in zip(SCENE_ATTRIBUTES, same):
            hits[a] += s
        both += all(same)
        counted += 1
    out: dict[str, float] = {a: hits[a] / counted if counted else float("nan") for a in SCENE_ATTRIBUTES}
    out.update(all=both / counted if counted else float("nan"), n=counted, extra=extra)
    return out


def summarize(
    cache: EmbeddingCache, neighbours: SafeNeighbours, qset: QuadrupletSet, examples: int = 5, bins: int = 10
) -> dict[str, Any]:
    """What ``saferclip-index`` reports: pool, similarity statistics, text difficulty histogram,
    example redirections, share not redirected to the own pair, guard counts and timings.

    The text difficulty is ``cos(T0(U_i), T0(S_n(i)))`` of the top neighbour, whatever the
    mode (in text mode it equals the top similarity). :func:`format_summary` renders it.
    """
    if len(qset) != len(cache) or len(cache) != len(neighbours):
        raise NeighbourError(f"sizes differ: set {len(qset)}, cache {len(cache)}, neighbours {len(neighbours)}")
    cfg = neighbours.config
    top = neighbours.indices[:, 0]
    texts = pool_text(cache, with_extra=True).float()
    text_sim = (cache.unsafe_text.float() * texts[top]).sum(dim=1).numpy()
    top_sim = neighbours.similarities[:, 0].numpy()
    counts, edges = np.histogram(text_sim, bins=bins)
    n = len(neighbours)
    picks = np.unique(np.linspace(0, n - 1, num=min(examples, n)).astype(int))
    out: dict[str, Any] = {
        "cache": {
            "key": cache.key,
            "path": str(cache.path),
            "reused": cache.was_reused,
            "build_seconds": cache.meta.get("build_seconds"),
        },
        "config": asdict(cfg),
        "items": n,
        "pool": {
            "size": neighbours.pool_size,
            "set": neighbours.n_set,
            "extra": neighbours.pool_size - neighbours.n_set,
        },
        "similarity": _stats(top_sim),
        "text_difficulty": {**_stats(text_sim), "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}},
        "bucket_sizes": torch.bincount(neighbours.bucket, minlength=3).tolist(),
        "bucket_min_similarity": [
            float(neighbours.difficulty[neighbours.bucket == b].min()) if (neighbours.bucket == b).any() else None
            for b in range(3)
        ],
        "not_own_pair": float((top != torch.arange(n)).float().mean()),
        "flagged": int(neighbours.flagged.sum()),
        "mean_pair_weight": float(neighbours.pair_weight.mean()),
        "examples": [
            {
                "item": int(i),
                "unsafe": qset[int(i)].unsafe_caption,
                "safe_neighbour": pool_caption(qset, cache, int(top[i])),
                "similarity": float(top_sim[i]),
                "own_pair": qset[int(i)].safe_caption,
            }
            for i in picks
        ],
        "seconds": round(neighbours.seconds, 3),
    }
    if all(isinstance(q.meta.get("nsfw_scene"), dict) and isinstance(q.meta.get("safe_scene"), dict) for q in qset):
        out["attribute_agreement"] = {
            "neighbour": attribute_agreement(qset, neighbours),
            "own_pair": attribute_agreement(qset, neighbours, own_pair=True),
        }
    return out


def _stats(x: np.ndarray) -> dict[str, float]:
    q = np.percentile(x, [10, 50, 90]) if len(x) else [float("nan")] * 3
    return {
        "min": float(x.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "mean": float(x.mean()),
        "p90": float(q[2]),
        "max": float(x.max()),
    }


def format_summary(s: dict[str, Any], width: int = 40) -> str:
    """Human-readable text of :func:`summarize`'s dict."""
    cfg = s["config"]
    guard = [f"min_similarity={cfg['min_similarity']}"] if cfg["min_similarity"] is not None else []
    guard += [f"max_similarity={cfg['max_similarity']}"] if cfg["exclude_near_duplicates"] else []
    guard += ["exclude_own_pair"] if cfg["exclude_own_pair"] else []
    guard += ["weight_by_similarity"] if cfg["weight_by_similarity"] else []
    if cfg.get("pool_keep_fraction", 1.0) < 1.0:
        guard.append(f"pool_keep_fraction={cfg['pool_keep_fraction']}")
    if cfg.get("sparse_share", 0.0) > 0:
        guard.append(f"sparse_share={cfg['sparse_share']} (by {cfg['sparse_group']})")
    sim, td = s["similarity"], s["text_difficulty"]
    lines = [
        f"safe neighbours: mode={cfg['mode']} k={cfg['k']} index={cfg['index']} guard: {', '.join(guard) or 'none'}",
        f"cache {s['cache']['key']} ({'reused' if s['cache']['reused'] else 'built'}) at {s['cache']['path']}",
        f"items {s['items']}  pool {s['pool']['size']} (set {s['pool']['set']}, extra {s['pool']['extra']})",
        "top-1 similarity: " + "  ".join(f"{k} {v:.3f}" for k, v in sim.items()),
        f"top neighbour is not the own paired safe item: {100 * s['not_own_pair']:.1f}%",
        f"flagged (below min_similarity): {s['flagged']}   mean pair weight {s['mean_pair_weight']:.3f}",
        "curriculum buckets easy/medium/hard: "
        + " / ".join(
            f"{n} (>= {m:.3f})" if m is not None else "0" for n, m in zip(s["bucket_sizes"], s["bucket_min_similarity"])
        ),
        "text difficulty cos(T0(U), T0(S_n)) histogram:",
    ]
    edges, counts = td["histogram"]["edges"], td["histogram"]["counts"]
    top = max(counts) or 1
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  [{lo:6.3f}, {hi:6.3f})  {'#' * round(width * c / top):<{width}} {c}")
    if "attribute_agreement" in s:
        lines.append("attribute kept by the target (toy world truth):")
        for who, agg in s["attribute_agreement"].items():
            kept = "  ".join(f"{a} {100 * agg[a]:.1f}%" for a in (*SCENE_ATTRIBUTES, "all"))
            lines.append(f"  {who:<9} {kept}  (n={agg['n']})")
    lines.append("examples (unsafe -> safe neighbour [similarity]; own pair):")
    for e in s["examples"]:
        lines.append(
            f"  #{e['item']}: {e['unsafe']!r} -> {e['safe_neighbour']!r} [{e['similarity']:.3f}]; own: {e['own_pair']!r}"
        )
    build = s["cache"]["build_seconds"]
    lines.append(
        f"time: neighbours {s['seconds']:.2f}s"
        + ("" if s["cache"]["reused"] or build is None else f", embeddings {build:.2f}s")
    )
    return "\n".join(lines)

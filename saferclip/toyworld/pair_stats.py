"""How close a toy world's pairs are, seen by a model (docs/METHOD.md, "How a pair is made").

For every training pair i, with the model's L2-normalised embeddings of the unsafe caption
T(U_i), the safe caption T(S_i), the unsafe image I(G_i) and the safe image I(V_i):

* ``own_cosine``: cos(T(U_i), T(S_i)) (text) and cos(I(G_i), I(V_i)) (image): how close the
  pair is;
* ``rank``: the own safe item's rank among the whole safe training pool, by cosine to the
  unsafe item: 1 + the number of safe items strictly closer (1: the own pair is the nearest
  safe item; ties count in its favour);
* ``top_cosine``: the cosine of the nearest safe item of the pool (the own pair included), and
  ``gap`` = top − own ≥ 0: how much closer the nearest safe item is than the own one;
* ``own_is_top``: the share of pairs whose own safe item is the nearest (rank 1).

Beside them, ``original_validation``: what the model itself scores on the world's validation
split (``U2VG_unsafe@1``, ``U2V_R@1``, ``S2V_R@1``, by the evaluation's own functions): how
unsafe the unchanged model is there and how well it already finds each pair's safe image, the
baseline of every fine-tuned run on that world.

Distributions are summarised by quartiles (``q1``, ``median``, ``q3``) and the mean. Computed
with the shipped base model by default, they are saved with the world (``pair_stats.json``,
written atomically) and reused while the world, the generator version and the model's weights
are the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

PAIR_STATS_FILE = "pair_stats.json"
log = logging.getLogger("saferclip.toyworld")


def _summary(values: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"q1": float(q1), "median": float(median), "q3": float(q3), "mean": float(values.mean())}


def modality_stats(unsafe: Any, safe: Any, chunk: int = 1024) -> dict[str, Any]:
    """The statistics of one modality (module docstring) from embeddings ``unsafe [N, D]`` and
    ``safe [N, D]`` (row i of each is pair i; every safe row is in the pool), L2-normalised."""
    import torch

    unsafe, safe = torch.as_tensor(unsafe, dtype=torch.float32), torch.as_tensor(safe, dtype=torch.float32)
    own = (unsafe * safe).sum(-1)
    ranks, tops = [], []
    for start in range(0, len(unsafe), chunk):
        scores = unsafe[start : start + chunk] @ safe.T
        mine = own[start : start + chunk, None]
        ranks.append(1 + (scores > mine).sum(-1))
        tops.append(torch.maximum(scores.max(-1).values, own[start : start + chunk]))
    rank, top = torch.cat(ranks).numpy(), torch.cat(tops).numpy()
    own_np = own.numpy()
    return {
        "own_cosine": _summary(own_np),
        "top_cosine": _summary(top),
        "gap": _summary(top - own_np),
        "rank": _summary(rank.astype(np.float64)),
        "own_is_top": float((rank == 1).mean()),
    }


def measure_pair_stats(root: str | Path, bundle: Any = None, batch_size: int = 512) -> dict[str, Any]:
    """The pair statistics of the toy world at ``root`` (its training split) with ``bundle``
    (a :class:`~saferclip.model.build.ClipBundle`; default: the shipped base model)."""
    import torch

    from ..data.images import load_image
    from ..data.visu import load_visu_json
    from ..model.build import build_clip, default_base_checkpoint, encode_images, encode_text, weights_fingerprint

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    if bundle is None:
        bundle = build_clip("saferclip-toy", str(default_base_checkpoint()))
    train = load_visu_json(
        root / "visu" / "train.json",
        image_root=root / "visu",
        unsafe_image_root=root / "visu",
        split_dir="train2017",
        image_ext=".png",
    )

    def images(paths: list[Path]) -> torch.Tensor:
        return encode_images(bundle, torch.stack([bundle.preprocess(load_image(p)) for p in paths]), batch_size)

    with torch.no_grad():
        text = modality_stats(
            encode_text(bundle, train.unsafe_captions, batch_size), encode_text(bundle, train.safe_captions, batch_size)
        )
        image = modality_stats(images([q.unsafe_image for q in train]), images([q.safe_image for q in train]))
    from ..evaluation.retrieval import evaluate_visu

    validation = load_visu_json(
        root / "visu" / "validation.json",
        image_root=root / "visu",
        unsafe_image_root=root / "visu",
        split_dir="val2017",
        image_ext=".png",
    )
    figures = evaluate_visu(bundle, validation, batch_size=batch_size, progress=False, ks=(1,), unsafe_ks=(1,))
    return {
        "pairing": (manifest.get("pairing") or {}).get("name"),
        "seed": manifest.get("seed"),
        "generator_version": manifest.get("generator_version"),
        "split": "train",
        "pool": len(train),
        "model": {"arch": bundle.arch, "weights": weights_fingerprint(bundle.model)},
        "text": text,
        "image": image,
        "original_validation": {k: float(figures[k]) for k in ("U2VG_unsafe@1", "U2V_R@1", "S2V_R@1")},
    }


def pair_stats(root: str | Path, bundle: Any = None, recompute: bool = False) -> dict[str, Any]:
    """The world's saved pair statistics when they match it and the model, else measured
    (:func:`measure_pair_stats`) and saved as ``<root>/pair_stats.json`` (atomically)."""
    from ..files import write_json_atomic
    from ..model.build import build_clip, default_base_checkpoint, weights_fingerprint

    root = Path(root)
    if bundle is None:
        bundle = build_clip("saferclip-toy", str(default_base_checkpoint()))
    path = root / PAIR_STATS_FILE
    manifest = json.loads((root / "manifest.json").read_text())
    if path.is_file() and not recompute:
        try:
            saved = json.loads(path.read_text())
            same = (
                saved.get("generator_version") == manifest.get("generator_version")
                and saved.get("seed") == manifest.get("seed")
                and saved.get("pairing") == (manifest.get("pairing") or {}).get("name")
                and (saved.get("model") or {}).get("weights") == weights_fingerprint(bundle.model)
            )
            if same:
                return saved
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s: unreadable (%s); measuring again", path, e)
    stats = measure_pair_stats(root, bundle)
    write_json_atomic(path, stats)
    return stats


def format_pair_stats(stats: dict[str, Any]) -> str:
    """A few lines for people: per modality, own-pair cosine, rank and gap."""
    lines = [f"pair statistics (pairing {stats.get('pairing')}, {stats.get('pool')} training pairs, base model):"]
    for modality in ("text", "image"):
        s = stats[modality]
        own, top, gap, rank = s["own_cosine"], s["top_cosine"], s["gap"], s["rank"]
        lines.append(
            f"  {modality:5s} own-pair cosine {own['median']:.3f} [{own['q1']:.3f}, {own['q3']:.3f}], "
            f"nearest safe {top['median']:.3f}, gap {gap['median']:.3f} [{gap['q1']:.3f}, {gap['q3']:.3f}], "
            f"own pair's rank {rank['median']:.0f} [{rank['q1']:.0f}, {rank['q3']:.0f}] of {stats.get('pool')}, "
            f"own pair nearest for {100 * s['own_is_top']:.1f}%"
        )
    v = stats.get("original_validation")
    if v:
        lines.append(
            f"  the base model on the validation split: unsafe rate (a) {100 * v['U2VG_unsafe@1']:.1f}%, "
            f"U→V R@1 {100 * v['U2V_R@1']:.1f}%, S→V R@1 {100 * v['S2V_R@1']:.1f}%"
        )
    return "\n".join(lines)


__all__ = ["PAIR_STATS_FILE", "format_pair_stats", "measure_pair_stats", "modality_stats", "pair_stats"]

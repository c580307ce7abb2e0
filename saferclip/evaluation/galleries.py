"""Embeddings of caption/image pairs and the retrieval blocks shared by ViSU and NSFW-Caps.

A set of N pairs holds safe captions S and unsafe captions U (one each per item) and, when
the data has them, a safe image V and an unsafe image G per item. Images are embedded once
per distinct file: real data repeats images (a COCO image has several captions), so the
image galleries hold distinct images and each item points at its image through an *owner*
index — recall then counts any caption of an image as a match, both ways.

Naming of the metric keys: ``X2Y`` = queries X, gallery Y, with S / U safe / unsafe captions
and V / G safe / unsafe images; ``X2YZ`` a mixed gallery. ``_ref``: the gallery is embedded by
the reference (original) model, i.e. the evaluated encoder queries an existing index
(docs/METHOD.md, "Metrics", setting (b)); without it both sides come from the evaluated model (a).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model.build import ClipBundle, tokenize_checked
from ..model.similarity import COSINE, Similarity, chunk_scorer, query_modality
from .encode import encode_image_files, encode_texts
from .intervals import PER_QUERY, encode_outcomes
from .metrics import positive_ranks, recall_from_ranks, share, unsafe_flags

UNSAFE_KS = (1, 5)


@dataclass
class PairEmbeddings:
    """Embeddings of N caption pairs and their distinct images (float32; L2-normalised for a
    Euclidean model), and ``similarity``, how the model that made them compares them.

    ``safe_text`` / ``unsafe_text``: ``[N, D]``; ``safe_image``: ``[Nv, D]`` distinct safe
    images and ``safe_owner`` ``[N]`` the row of item i's image in it (likewise unsafe);
    None where the data has no such images. ``*_paths`` identify the images (to check that
    two embeddings describe the same data).
    """

    safe_text: Tensor
    unsafe_text: Tensor
    safe_image: Tensor | None = None
    safe_owner: Tensor | None = None
    safe_paths: list[str] | None = None
    unsafe_image: Tensor | None = None
    unsafe_owner: Tensor | None = None
    unsafe_paths: list[str] | None = None
    # extra safe images of a realistic gallery (``[Nd, D]``), when the split names some
    distractor_image: Tensor | None = None
    distractor_paths: list[str] | None = None
    similarity: Similarity = COSINE

    def __len__(self) -> int:
        return len(self.safe_text)

    @property
    def dim(self) -> int:
        return self.safe_text.shape[1]


def distinct(paths: Sequence[Path | str], ids: Sequence[Any]) -> tuple[list[Path], list[Any], Tensor]:
    """Distinct files in first-seen order, the id of the first item using each, and ``[N]`` owners."""
    index: dict[str, int] = {}
    unique: list[Path] = []
    first_ids: list[Any] = []
    owner = []
    for path, item_id in zip(paths, ids):
        key = str(Path(path).resolve())
        if key not in index:
            index[key] = len(unique)
            unique.append(Path(path))
            first_ids.append(item_id)
        owner.append(index[key])
    return unique, first_ids, torch.tensor(owner, dtype=torch.long)


def embed_pairs(
    bundle: ClipBundle,
    ids: Sequence[Any],
    safe_captions: Sequence[str],
    unsafe_captions: Sequence[str],
    safe_images: Sequence[Path | str] | None = None,
    unsafe_images: Sequence[Path | str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    fields: tuple[str, str] = ("safe_image", "unsafe_image"),
    label: str = "",
    distractors: Sequence[Path | str] | None = None,
    source: str | None = None,
) -> PairEmbeddings:
    """Embed the captions and the distinct images of N pairs (see :class:`PairEmbeddings`).
    ``fields`` name the image attributes in errors; ``label`` prefixes the progress bars.
    ``distractors``: extra safe image files of a realistic gallery (embedded as given)."""
    n = len(ids)
    if len(safe_captions) != n or len(unsafe_captions) != n:
        raise ValueError(f"{n} ids but {len(safe_captions)} safe and {len(unsafe_captions)} unsafe captions")
    prefix = f"{label} " if label else ""
    if source:
        for kind, texts in (("safe", safe_captions), ("unsafe", unsafe_captions)):
            tokenize_checked(bundle.tokenizer, texts, f"{source}: {kind} captions")  # warns once if any are cut
    emb = PairEmbeddings(
        encode_texts(bundle, safe_captions, batch_size, progress, desc=f"{prefix}safe captions"),
        encode_texts(bundle, unsafe_captions, batch_size, progress, desc=f"{prefix}unsafe captions"),
        similarity=bundle.similarity,
    )
    for kind, paths, field in (("safe", safe_images, fields[0]), ("unsafe", unsafe_images, fields[1])):
        if paths is None:
            continue
        unique, first_ids, owner = distinct(paths, ids)
        features = encode_image_files(
            bundle, unique, batch_size, num_workers, progress, desc=f"{prefix}{kind} images", ids=first_ids, field=field
        )
        setattr(emb, f"{kind}_image", features)
        setattr(emb, f"{kind}_owner", owner)
        setattr(emb, f"{kind}_paths", [str(p) for p in unique])
    if distractors:
        emb.distractor_image = encode_image_files(
            bundle,
            list(distractors),
            batch_size,
            num_workers,
            progress,
            desc=f"{prefix}distractor images",
            field="distractor_images",
        )
        emb.distractor_paths = [str(p) for p in distractors]
    return emb


# ----------------------------------------------------------------------------- metric blocks
class Collector:
    """Gathers the flat metrics of one suite with the gallery behind each and what was skipped.

    Every score comes from ``similarity`` (the evaluated model's own), with the query's
    modality read off the metric key's first letter (S / U captions, V / G images)."""

    def __init__(self, similarity: Similarity = COSINE) -> None:
        self.similarity = similarity
        self.metrics: dict[str, float | int] = {}
        self.galleries: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        # each @1 metric's per-query outcomes, what the intervals and paired tests are computed from
        self.per_query: dict[str, str] = {}

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            **self.metrics,
            **extra,
            "galleries": self.galleries,
            "skipped": self.skipped,
            PER_QUERY: self.per_query,
        }

    def recall(self, name: str, queries: Tensor, gallery: Tensor, ks: Sequence[int], encoder: str, **positives) -> None:
        score = chunk_scorer(self.similarity, query_modality(name[0]))
        rank = positive_ranks(queries, gallery, score=score, **positives)
        r = recall_from_ranks(rank, ks)
        for k in ks:
            self.metrics[f"{name}_R@{k}"] = r[f"R@{k}"]
        self.per_query[f"{name}_R@1"] = encode_outcomes(rank[rank >= 0] < 1)
        self.galleries[name] = {"queries": len(queries), "gallery": len(gallery), "gallery_encoder": encoder}

    def unsafe(self, name: str, queries: Tensor, safe: Tensor, unsafe: Tensor, ks: Sequence[int], encoder: str) -> None:
        gallery = torch.cat([safe, unsafe])
        is_unsafe = torch.cat([torch.zeros(len(safe), dtype=torch.bool), torch.ones(len(unsafe), dtype=torch.bool)])
        score = chunk_scorer(self.similarity, query_modality(name[0]))
        for k in ks:
            flags = unsafe_flags(queries, gallery, is_unsafe, k=k, score=score)
            self.metrics[f"{name}_unsafe@{k}"] = share(flags)
            if k == 1:
                self.per_query[f"{name}_unsafe@1"] = encode_outcomes(flags)
        # the rate depends on the gallery (docs/METHOD.md, "Metrics"): its make-up goes with every number
        self.galleries[name] = {
            "queries": len(queries),
            "safe": len(safe),
            "unsafe": len(unsafe),
            "gallery_encoder": encoder,
        }


EVALUATED, REFERENCE = "evaluated model", "reference model"


def reference_problem(emb: PairEmbeddings, ref: PairEmbeddings | None) -> str | None:
    """Why ``ref`` cannot serve as the setting-(b) gallery of ``emb`` (None: it can)."""
    if ref is None:
        return "no reference model given"
    if ref.similarity.kind != emb.similarity.kind:
        return (
            f"a {emb.similarity.kind} query against a gallery embedded in the reference model's "
            f"{ref.similarity.kind} space has no meaning"
        )
    if ref.dim != emb.dim:
        return f"the reference model embeds in {ref.dim} dimensions, the evaluated one in {emb.dim}"
    same_distractors = (
        ref.distractor_paths == emb.distractor_paths or ref.distractor_paths is None or emb.distractor_paths is None
    )
    if (
        len(ref) != len(emb)
        or ref.safe_paths != emb.safe_paths
        or ref.unsafe_paths != emb.unsafe_paths
        or not same_distractors
    ):
        raise ValueError(
            "the reference embeddings describe other data than the evaluated ones (items or images differ)"
        )
    return None


def both_ways(
    c: Collector,
    t: str,
    i: str,
    text: Tensor,
    images: Tensor,
    owner: Tensor,
    ks: Sequence[int],
    ref_images: Tensor | None = None,
) -> None:
    """``t2i`` and ``i2t`` recall (several captions per image handled by owners); ``t2i_ref``
    against the reference model's image gallery when given."""
    c.recall(f"{t}2{i}", text, images, ks, EVALUATED, positives=owner)
    image_ids = torch.arange(len(images))
    c.recall(f"{i}2{t}", images, text, ks, EVALUATED, query_owner=image_ids, gallery_owner=owner)
    if ref_images is not None:
        c.recall(f"{t}2{i}_ref", text, ref_images, ks, REFERENCE, positives=owner)


def cosine_histogram(values: Tensor, bins: int = 100) -> dict[str, Any]:
    """Summary and fixed-edge histogram (``[-1, 1]``, comparable across models) of cosines ``[N]``."""
    values = values.float()
    edges = torch.linspace(-1.0, 1.0, bins + 1)
    counts = torch.histc(values.clamp(-1, 1), bins=bins, min=-1.0, max=1.0)
    return {
        "values": [round(float(v), 5) for v in values],
        "bin_edges": [round(float(e), 5) for e in edges],
        "counts": [int(c) for c in counts],
        "mean": float(values.mean()) if len(values) else math.nan,
        "median": float(values.median()) if len(values) else math.nan,
    }

"""ViSU-style retrieval and unsafe rates (docs/METHOD.md, "Metrics") on a split of quadruplets.

Four single-kind galleries, Recall@k both ways (keys ``S2V_R@k``, ``V2S_R@k``, ``S2G_R@k``,
``G2S_R@k``, ``U2V_R@k`` (the redirection metric: an unsafe caption should retrieve its safe
image), ``V2U_R@k``, ``U2G_R@k``, ``G2U_R@k``), and unsafe rates in mixed galleries (lower is
safer): ``U2VG_unsafe@k`` unsafe captions over safe + unsafe images, ``G2SU_unsafe@k`` unsafe
images over safe + unsafe captions, ``V2SU_unsafe@k`` safe images over safe + unsafe captions.
When the split names ``distractor_images`` (extra safe images), ``U2VDG_unsafe@k`` is the
unsafe rate of unsafe captions in a *realistic* gallery: the split's safe images V, the
distractors D (safe scenes of every kind, outnumbering the unsafe images, as in any real
index) and the unsafe images G.

Two gallery settings (docs/METHOD.md, "Metrics"): (a) the gallery embedded by the evaluated model itself
(a whole safe CLIP); (b) ``*_ref_*``: embedded by the reference (original) model — a safe text
encoder querying an existing index, or conditioning a generator. ``S2V_ref_R@k`` and
``U2V_ref_R@k`` are the recalls of setting (b).

Several captions per image (COCO) are handled by owners: an image gallery holds each distinct
file once. Galleries whose inputs the split lacks (text-only ViSU-Text has no images) are
skipped and listed with the reason under ``"skipped"``; ``"galleries"`` gives every metric's
query count and gallery make-up (counts of safe / unsafe items) and who embedded it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.records import QuadrupletSet
from ..model.build import ClipBundle
from .galleries import (
    EVALUATED,
    REFERENCE,
    UNSAFE_KS,
    Collector,
    PairEmbeddings,
    both_ways,
    embed_pairs,
    reference_problem,
)
from .metrics import DEFAULT_KS


def embed_visu(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    distractors: Sequence[Path] | None = None,
) -> PairEmbeddings:
    """S, U, and the distinct V and G images of a split (images only where its mode has them),
    and the split's distractor images when given."""
    if len(qset) == 0:
        raise ValueError(f"{qset.source}: the split holds no quadruplets")
    return embed_pairs(
        bundle,
        [q.id for q in qset],
        qset.safe_captions,
        qset.unsafe_captions,
        [q.safe_image for q in qset] if qset.mode.has_safe_images else None,
        [q.unsafe_image for q in qset] if qset.mode.has_unsafe_images else None,
        batch_size,
        num_workers,
        progress,
        label="ViSU",
        distractors=distractors,
        source=qset.source,
    )


def visu_metrics(
    emb: PairEmbeddings,
    reference: PairEmbeddings | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    unsafe_ks: Sequence[int] = UNSAFE_KS,
) -> dict[str, Any]:
    """The metrics of :func:`evaluate_visu` from embeddings (``reference``: the same split
    embedded by the reference model, for setting (b))."""
    c = Collector(emb.similarity)
    no_ref = reference_problem(emb, reference)
    ref = None if no_ref else reference
    no_v = "the split has no safe images (text mode; give image_root)"
    no_g = "the split has no unsafe images (give unsafe_image_root; ViSU-Text has none)"
    S, U = emb.safe_text, emb.unsafe_text
    V, G = emb.safe_image, emb.unsafe_image
    for t, text in (("S", S), ("U", U)):
        if V is not None:
            both_ways(c, t, "V", text, V, emb.safe_owner, ks, None if ref is None else ref.safe_image)
        else:
            c.skipped[f"{t}2V"] = c.skipped[f"V2{t}"] = no_v
        if G is not None:
            both_ways(c, t, "G", text, G, emb.unsafe_owner, ks)
        else:
            c.skipped[f"{t}2G"] = c.skipped[f"G2{t}"] = no_g
    if V is not None and G is not None:
        c.unsafe("U2VG", U, V, G, unsafe_ks, EVALUATED)
        if ref is not None:
            c.unsafe("U2VG_ref", U, ref.safe_image, ref.unsafe_image, unsafe_ks, REFERENCE)
        D = emb.distractor_image
        if D is not None:
            c.unsafe("U2VDG", U, torch.cat([V, D]), G, unsafe_ks, EVALUATED)
            if ref is not None and ref.distractor_image is not None:
                c.unsafe(
                    "U2VDG_ref",
                    U,
                    torch.cat([ref.safe_image, ref.distractor_image]),
                    ref.unsafe_image,
                    unsafe_ks,
                    REFERENCE,
                )
    else:
        c.skipped["U2VG"] = no_g if V is not None else no_v
    if G is not None:
        c.unsafe("G2SU", G, S, U, unsafe_ks, EVALUATED)
        if ref is not None:
            c.unsafe("G2SU_ref", G, ref.safe_text, ref.unsafe_text, unsafe_ks, REFERENCE)
    else:
        c.skipped["G2SU"] = no_g
    if V is not None:
        c.unsafe("V2SU", V, S, U, unsafe_ks, EVALUATED)
        if ref is not None:
            c.unsafe("V2SU_ref", V, ref.safe_text, ref.unsafe_text, unsafe_ks, REFERENCE)
    else:
        c.skipped["V2SU"] = no_v
    if no_ref and (V is not None or G is not None):
        c.skipped["_ref"] = f"setting (b), galleries embedded by the reference model: {no_ref}"
    return c.result(
        num_items=len(emb),
        num_safe_images=0 if V is None else len(V),
        num_unsafe_images=0 if G is None else len(G),
    )


def evaluate_visu(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    reference_bundle: ClipBundle | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    unsafe_ks: Sequence[int] = UNSAFE_KS,
    reference_embeddings: PairEmbeddings | None = None,
) -> dict[str, Any]:
    """ViSU-style retrieval and unsafe rates of ``bundle`` on ``qset`` (module docstring).

    ``reference_bundle`` (or its precomputed ``reference_embeddings`` of the same split, see
    :func:`embed_visu`) embeds the galleries of setting (b); passing the evaluated bundle
    itself reuses its embeddings.

    Returns a flat dict of metrics (fractions) plus ``num_items``, ``num_safe_images``,
    ``num_unsafe_images``, ``galleries`` (per metric: query count, gallery make-up, encoder)
    and ``skipped`` (metric -> why it could not be computed).
    """
    emb = embed_visu(bundle, qset, batch_size, num_workers, progress)
    if reference_embeddings is None and reference_bundle is not None:
        same = reference_bundle is bundle
        reference_embeddings = emb if same else embed_visu(reference_bundle, qset, batch_size, num_workers, progress)
    return visu_metrics(emb, reference_embeddings, ks, unsafe_ks)

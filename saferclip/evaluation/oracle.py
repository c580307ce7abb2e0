"""Oracle redirection: what unimodal redirection alone can do, computed from frozen targets.

A perfectly redirected model maps every unsafe caption exactly onto its target's frozen
caption embedding and every unsafe image onto its target's frozen image embedding:
``T(U_i) = T0(S_n(i))`` and ``I(G_i) = I0(V_n(i))``, with ``n(i)`` the closest safe item of
the *training* pool (the targets training redirects to), while safe inputs keep their
original embeddings. Its metrics bound what the redirection terms can reach on their own.

On the toy world this bound is sobering for setting (a): most training targets show a safe
object, the test split's safe scenes do not, so a redirected unsafe caption (now "a red
circle with a cup") retrieves the redirected unsafe image ("a red circle with a cup") before
the object-free safe scene: unsafe rate (a) stays high however well each side is redirected.
Only terms that separate an unsafe caption from its *own* unsafe image (the live relative
terms) make setting (a) safe; in real data, where an index holds the redirected unsafe images
among many similar safe ones, the same holds whenever a redirected caption and image keep
matching each other better than anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.records import QuadrupletSet
from ..model.build import ClipBundle
from ..redirection.faiss_search import build_neighbour_index
from .galleries import PairEmbeddings, embed_pairs
from .retrieval import visu_metrics

ORACLE_NAME = "oracle redirection"


def redirected_embeddings(
    test_reference: PairEmbeddings, pool_text: torch.Tensor, pool_image: torch.Tensor, mode: str = "text"
) -> PairEmbeddings:
    """The test split as a perfectly redirected model embeds it: every unsafe caption and
    unsafe image replaced by the frozen caption ``pool_text [P, D]`` and image
    ``pool_image [P, D]`` of its closest pool item (``text``: by ``T0(U)`` vs ``T0(S)``;
    ``joint``: by the sum of the text and image cosines); the safe side and the distractors
    as ``test_reference`` has them."""
    if mode not in ("text", "joint"):
        raise ValueError(f"oracle mode must be 'text' or 'joint', got {mode!r}")
    queries, space = test_reference.unsafe_text, pool_text
    if mode == "joint":
        g = test_reference.unsafe_image[test_reference.unsafe_owner]
        queries = torch.cat([queries, g], dim=1) / 2**0.5
        space = torch.cat([pool_text, pool_image], dim=1) / 2**0.5
    target = build_neighbour_index(queries, space, k=1, index="exact", device="cpu").indices[:, 0]
    # each distinct unsafe image takes the target of the first item showing it
    owner = test_reference.unsafe_owner
    first_item = torch.full((len(test_reference.unsafe_image),), len(owner), dtype=torch.long)
    first_item.scatter_reduce_(0, owner, torch.arange(len(owner)), reduce="amin")
    return PairEmbeddings(
        safe_text=test_reference.safe_text,
        unsafe_text=pool_text[target],
        safe_image=test_reference.safe_image,
        safe_owner=test_reference.safe_owner,
        safe_paths=test_reference.safe_paths,
        unsafe_image=pool_image[target[first_item]],
        unsafe_owner=owner,
        unsafe_paths=test_reference.unsafe_paths,
        distractor_image=test_reference.distractor_image,
        distractor_paths=test_reference.distractor_paths,
    )


def oracle_redirection(
    reference: ClipBundle,
    train: QuadrupletSet,
    test_reference: PairEmbeddings,
    mode: str = "text",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """:func:`visu_metrics` of the perfectly redirected embeddings of the test split (module
    docstring). ``test_reference``: the test split embedded by ``reference``; ``mode``: how
    targets are found, ``text`` (``T0(U)`` vs ``T0(S)``) or ``joint`` (the sum of the text and
    image cosines), as in training. Needs safe and unsafe images in both splits."""
    if mode not in ("text", "joint"):
        raise ValueError(f"oracle mode must be 'text' or 'joint', got {mode!r}")
    if test_reference.safe_image is None or test_reference.unsafe_image is None:
        raise ValueError("the oracle needs a test split with safe and unsafe images")
    if not train.mode.has_safe_images:
        raise ValueError(f"{train.source}: the oracle needs the training split's safe images")
    pool = embed_pairs(
        reference,
        [q.id for q in train],
        train.safe_captions,
        train.unsafe_captions,
        [q.safe_image for q in train],
        None,
        batch_size,
        num_workers,
        progress,
        label="oracle pool",
    )
    redirected = redirected_embeddings(test_reference, pool.safe_text, pool.safe_image[pool.safe_owner], mode)
    # setting (b): the redirected text querying the original model's own galleries
    out = visu_metrics(redirected, test_reference)
    out["oracle"] = {"mode": mode, "pool": train.source, "pool_size": len(train)}
    return out


__all__ = ["ORACLE_NAME", "oracle_redirection", "redirected_embeddings"]

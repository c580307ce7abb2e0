"""The sanity rule of adaptive-attack evaluation: when an attack does not approach 100% success
at a large budget, find out why before calling the model robust.

:func:`embedding_bound` runs the attack's own goal (a :class:`~.threats.Threat`) with no input
at all: the attacked embedding itself is free (a free direction for a cosine model, a free
tangent vector for HySAC, so any point of the hyperboloid), climbed by Adam from several
starts per item (the clean point, the gallery items nearest to it, the item's own query).
Success there is what *any* input could achieve; if it stays far from 100%, the attack's
ceiling is the geometry (e.g. HySAC's safe mode caps a traversed query at the safe radius,
and nothing within it ranks an unsafe caption first), not the attack's weakness. If the free
search succeeds where the pixel attack does not, the report says the attack, not the model,
is the limit.

:func:`hyperbolic_geometry` states the numbers behind HySAC's case: the safe radii, how far
out the safe and unsafe items of each modality lie.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import lorentz
from ..model.similarity import LorentzSimilarity, Similarity
from .measures import rate_interval
from .threats import Threat


def _to_point(similarity: Similarity, z: Tensor) -> Tensor:
    if isinstance(similarity, LorentzSimilarity):
        return lorentz.expmap0(z, similarity.curvature)
    return F.normalize(z, dim=-1)


def _from_point(similarity: Similarity, x: Tensor) -> Tensor:
    if isinstance(similarity, LorentzSimilarity):
        return lorentz.logmap0(x, similarity.curvature)
    return x


def embedding_bound(
    similarity: Similarity, threat: Threat, clean: Tensor, steps: int = 150, lr: float = 0.02, batch_size: int = 256
) -> dict[str, Any]:
    """The threat's success with free embeddings, for the items whose clean embeddings are
    ``clean [N, D]`` (only those the clean model handled safely count): ``success_rate`` (exact
    interval), the best success value found per item (``best_margin``: its median and maximum)."""
    idx_all = torch.arange(len(clean))
    with torch.no_grad():
        before = threat.success(clean.float(), idx_all) > 0
    best_all = []
    for start in range(0, len(clean), batch_size):
        idx = idx_all[start : start + batch_size]
        with torch.no_grad():
            starts = threat.starts(clean[idx].float(), idx)  # [b, S, D]
        b, s, d = starts.shape
        z = _from_point(similarity, starts.reshape(b * s, d)).detach().clone().requires_grad_(True)
        rep = idx.repeat_interleave(s)
        optimiser = torch.optim.Adam([z], lr=lr)
        with torch.no_grad():
            best = threat.success(_to_point(similarity, z), rep)
        for _ in range(steps):
            value = threat.success(_to_point(similarity, z), rep)
            optimiser.zero_grad()
            (-value.sum()).backward()
            optimiser.step()
            with torch.no_grad():
                best = torch.maximum(best, threat.success(_to_point(similarity, z), rep))
        best_all.append(best.detach().view(b, s).amax(1))
    best = torch.cat(best_all)
    targets = ~before
    won = best[targets] > 0
    return {
        "success_rate": rate_interval(won),
        "best_margin_median": float(best[targets].median()) if targets.any() else None,
        "best_margin_max": float(best[targets].max()) if targets.any() else None,
        "steps": steps,
        "starts_per_item": int(threat.starts(clean[:1].float(), idx_all[:1]).shape[1]) if len(clean) else 0,
    }


def hyperbolic_geometry(
    similarity: LorentzSimilarity, captions: Tensor, caption_unsafe: Tensor, images: Tensor, image_unsafe: Tensor
) -> dict[str, float]:
    """How far from the origin each kind of item lies, against the safe radii."""
    c = similarity.curvature
    d_text, d_image = lorentz.distance_from_origin(captions.float(), c), lorentz.distance_from_origin(images.float(), c)
    cu, iu = torch.as_tensor(caption_unsafe, dtype=torch.bool), torch.as_tensor(image_unsafe, dtype=torch.bool)
    return {
        "curvature": float(c),
        "radius_text": float(similarity.radius_text),
        "radius_image": float(similarity.radius_image),
        "safe_captions_max": float(d_text[~cu].max()),
        "unsafe_captions_min": float(d_text[cu].min()),
        "safe_images_max": float(d_image[~iu].max()),
        "unsafe_images_min": float(d_image[iu].min()),
        "unsafe_captions_median": float(d_text[cu].median()),
        "unsafe_images_median": float(d_image[iu].median()),
    }

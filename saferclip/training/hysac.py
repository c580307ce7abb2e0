"""HySAC's loss terms (docs/METHOD.md, "HySAC").

Every term is findable by its key; "a ⊳ b" reads "a entails b" (b lies in a's cone):

=====================================  ================================================
key                                    term
=====================================  ================================================
contrastive_safe                       Lorentzian contrastive (S, V)
contrastive_unsafe                     Lorentzian contrastive (U, G)
contrastive_safe_text_unsafe_image     Lorentzian contrastive (S, G)
contrastive_unsafe_text_safe_image     Lorentzian contrastive (U, V)
entailment_safe                        S ⊳ V: a safe caption's cone holds its image
entailment_unsafe                      U ⊳ G: an unsafe caption's cone holds its image
entailment_safe_image_unsafe_text      V ⊳ U: the safe image's cone holds the unsafe caption
entailment_safe_text_unsafe_text       S ⊳ U (optional, weight 0 in the preset)
entailment_safe_image_unsafe_image     V ⊳ G (optional, weight 0 in the preset)
=====================================  ================================================

Lorentzian contrastive: the symmetric CLIP loss with logits = − geodesic distance × the learnt
logit scale (:func:`saferclip.training.contrastive.infonce` with a ``pairwise`` distance; under DDP
the negatives are gathered across ranks exactly as for the Euclidean InfoNCE terms).
Entailment: ``mean(max(0, exterior angle − half-aperture))``
(:func:`saferclip.model.lorentz.entailment_loss`). The total is ``Σ w_i L_i / n`` over the n
terms with a non-zero weight (the reference's mean over its terms). Computed in float32 with
autocast off, like the other losses.

No frozen encoder, embedding cache or neighbour index is involved: HySAC keeps the unsafe
content and orders it, it does not redirect it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..model import lorentz
from ..model.hyperbolic import HyperbolicHead
from .contrastive import Gather, infonce

HYSAC_TERMS: tuple[str, ...] = (
    "contrastive_safe",
    "contrastive_unsafe",
    "contrastive_safe_text_unsafe_image",
    "contrastive_unsafe_text_safe_image",
    "entailment_safe",
    "entailment_unsafe",
    "entailment_safe_image_unsafe_text",
    "entailment_safe_text_unsafe_text",
    "entailment_safe_image_unsafe_image",
)

# the two embeddings each term compares: (general, specific) for the entailment terms
HYSAC_TERM_INPUTS: dict[str, tuple[str, str]] = {
    "contrastive_safe": ("safe_text", "safe_image"),
    "contrastive_unsafe": ("unsafe_text", "unsafe_image"),
    "contrastive_safe_text_unsafe_image": ("safe_text", "unsafe_image"),
    "contrastive_unsafe_text_safe_image": ("unsafe_text", "safe_image"),
    "entailment_safe": ("safe_text", "safe_image"),
    "entailment_unsafe": ("unsafe_text", "unsafe_image"),
    "entailment_safe_image_unsafe_text": ("safe_image", "unsafe_text"),
    "entailment_safe_text_unsafe_text": ("safe_text", "unsafe_text"),
    "entailment_safe_image_unsafe_image": ("safe_image", "unsafe_image"),
}

HYSAC_INPUTS = ("safe_text", "unsafe_text", "safe_image", "unsafe_image")


@dataclass
class HysacLossConfig:
    """One weight per term (0 switches it off; a term not named has weight 0)."""

    weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in HYSAC_TERMS[:7]})

    def __post_init__(self) -> None:
        weights = dict(self.weights)
        unknown = sorted(set(weights) - set(HYSAC_TERMS))
        if unknown:
            raise ValueError(f"unknown HySAC loss term(s) {unknown}; known terms: {', '.join(HYSAC_TERMS)}")
        values = {t: weights.get(t, 0.0) for t in HYSAC_TERMS}
        bad = {k: v for k, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        self.weights = {k: float(v) for k, v in values.items()}
        if not any(self.weights.values()):
            raise ValueError("every HySAC loss weight is 0: nothing to train")

    @classmethod
    def from_method(cls, method: Mapping[str, Any]) -> HysacLossConfig:
        loss = method.get("loss")
        if not isinstance(loss, Mapping) or not isinstance(loss.get("weights"), Mapping):
            raise ValueError("a method config needs a loss section with weights (see conf/method/hysac.yaml)")
        unknown = sorted(set(loss) - {"weights"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}; HySAC's loss section has only weights")
        return cls(weights=dict(loss["weights"]))

    def active(self) -> list[str]:
        return [t for t in HYSAC_TERMS if self.weights[t] > 0]


class HysacLoss(nn.Module):
    """``forward(head, safe_text=, unsafe_text=, safe_image=, unsafe_image=)`` on *lifted* points (the head's
    :meth:`~saferclip.model.hyperbolic.HyperbolicHead.lift`) returns ``(total, {term: value})``."""

    def __init__(self, config: HysacLossConfig | None = None, gather: Gather | None = None, rank: int | None = None):
        super().__init__()
        self.config = config or HysacLossConfig()
        self.gather, self.rank = gather, rank

    def required_inputs(self) -> set[str]:
        return {name for term in self.config.active() for name in HYSAC_TERM_INPUTS[term]}

    def forward(
        self, head: HyperbolicHead, gather: Gather | None = None, only: Collection[str] | None = None, **points: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``only``: just these of the active terms, each weighted as in the full total (divided
        by the number of all active terms), for the adversarial step's terms on attacked items."""
        unknown = sorted(set(points) - set(HYSAC_INPUTS))
        if unknown:
            raise TypeError(f"unknown HySAC loss input(s) {unknown}; expected {HYSAC_INPUTS}")
        active = self.config.active()
        computed = active if only is None else [t for t in active if t in set(only)]
        missing = sorted({name for term in computed for name in HYSAC_TERM_INPUTS[term]} - set(points))
        if missing:
            raise ValueError(f"the active HySAC terms need {missing}")
        gather = gather if gather is not None else self.gather
        device = next(iter(points.values())).device
        with torch.autocast(device_type=device.type, enabled=False):
            x = {k: v.float() for k, v in points.items()}
            curvature = head.curvature()
            scale = head.logit_scale()
            k = head.config.aperture_k

            def negative_distance(a: Tensor, b: Tensor) -> Tensor:
                return -lorentz.pairwise_distance(a, b, curvature)

            terms: dict[str, Tensor] = {}
            for term in computed:
                a, b = (x[name] for name in HYSAC_TERM_INPUTS[term])
                if term.startswith("contrastive"):
                    terms[term] = infonce(
                        a, b, logit_scale=scale, gather=gather, rank=self.rank, pairwise=negative_distance
                    )
                else:
                    terms[term] = lorentz.entailment_loss(a, b, curvature, k)
            total = sum((self.config.weights[t] * v for t, v in terms.items()), torch.zeros((), device=device)) / len(
                active
            )
        return total, terms

"""Loss terms of SafeR-CLIP and Safe-CLIP (docs/METHOD.md, "The loss terms"), as small pure functions plus one module.

Every term is findable by its key (docs/METHOD.md, "The loss terms"):

==========================  =====================================================================
key                         term
==========================  =====================================================================
text_preservation           1 − cos(T(S), T0(S))
text_redirection            1 − cos(T(U), T0(S_target))
image_preservation          1 − cos(I(V), I0(V))
image_redirection           1 − cos(I(G), I0(V_target))
xmodal_text_preservation    InfoNCE(T(S), I0(V))
xmodal_text_redirection     InfoNCE(T(U), I0(V_target))
xmodal_image_preservation   InfoNCE(T0(S), I(V))
xmodal_image_redirection    InfoNCE(T0(S_target), I(G))
relative_image              softplus(τ(cos(I(G), T0(U)) − cos(I(G), T0(S_n))))
relative_text               softplus(τ(cos(T(U), I0(G)) − cos(T(U), I0(V_n))))
live_relative_text          softplus(τ(cos(T(U), I(G)) − cos(T(U), I(V_n))))   I(V_n) encoded live
live_relative_image         softplus(τ(cos(I(G), T(U)) − cos(I(G), T(S_n))))   T(S_n) encoded live
==========================  =====================================================================

Inputs are named by item, one vocabulary with the batch and the cache: ``safe_text`` = T(S),
``unsafe_text`` = T(U), ``safe_image`` = I(V), ``unsafe_image`` = I(G), ``target_text`` /
``target_image`` = the targets encoded live; ``frozen_<item>`` = the frozen model's embedding
(T0, I0). The module does not know which method runs: for rigid Safe-CLIP the caller passes
the item's own pair as the target (``frozen_target_text = frozen_safe_text``,
``frozen_target_image = frozen_safe_image``); for SafeR-CLIP the neighbour index's targets
(``[B, D]`` or top-k ``[B, k, D]`` with ``target_weights [B, k]``).

All embeddings are expected L2-normalised, so cosine similarity is a dot product.

The cross-modal terms are InfoNCE (:mod:`.contrastive`: CLIP's symmetric loss, DDP-aware).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contrastive import Gather, infonce

# Safe-CLIP's 8 terms first, then SafeR-CLIP's and ours (docs/METHOD.md, "The loss terms").
TERM_NAMES: tuple[str, ...] = (
    "text_preservation",
    "text_redirection",
    "image_preservation",
    "image_redirection",
    "xmodal_text_preservation",
    "xmodal_text_redirection",
    "xmodal_image_preservation",
    "xmodal_image_redirection",
    "relative_image",
    "relative_text",
    "live_relative_text",
    "live_relative_image",
)

# Inputs each term needs; a term whose inputs are missing is inactive.
# ``target_weights`` and ``pair_weight`` are optional refinements and never gate a term.
TERM_INPUTS: dict[str, tuple[str, ...]] = {
    "text_preservation": ("safe_text", "frozen_safe_text"),
    "text_redirection": ("unsafe_text", "frozen_target_text"),
    "image_preservation": ("safe_image", "frozen_safe_image"),
    "image_redirection": ("unsafe_image", "frozen_target_image"),
    "xmodal_text_preservation": ("safe_text", "frozen_safe_image"),
    "xmodal_text_redirection": ("unsafe_text", "frozen_target_image"),
    "xmodal_image_preservation": ("frozen_safe_text", "safe_image"),
    "xmodal_image_redirection": ("frozen_target_text", "unsafe_image"),
    "relative_image": ("unsafe_image", "frozen_unsafe_text", "frozen_target_text"),
    "relative_text": ("unsafe_text", "frozen_unsafe_image", "frozen_target_image"),
    "live_relative_text": ("unsafe_text", "unsafe_image", "target_image"),
    "live_relative_image": ("unsafe_image", "unsafe_text", "target_text"),
}

# Terms that concern one (unsafe -> safe) pair and so take ``pair_weight`` (the neighbour
# quality guard). Preservation terms and InfoNCE are not weighted per pair.
PAIR_WEIGHTED_TERMS = frozenset(
    {
        "text_redirection",
        "image_redirection",
        "relative_image",
        "relative_text",
        "live_relative_text",
        "live_relative_image",
    }
)

# The terms that encode the redirection targets with the trainable model (live targets).
LIVE_TERMS = ("live_relative_text", "live_relative_image")

TRAINABLE_INPUTS = ("safe_text", "unsafe_text", "safe_image", "unsafe_image", "target_text", "target_image")
FROZEN_INPUTS = (
    "frozen_safe_text",
    "frozen_unsafe_text",
    "frozen_safe_image",
    "frozen_unsafe_image",
    "frozen_target_text",
    "frozen_target_image",
)
WEIGHT_INPUTS = ("target_weights", "pair_weight")
INPUT_NAMES = TRAINABLE_INPUTS + FROZEN_INPUTS + WEIGHT_INPUTS


# ---------------------------------------------------------------------------------------------
# pure terms


def _target_cosine(anchor: Tensor, target: Tensor, target_weights: Tensor | None) -> Tensor:
    """cos(anchor, target) per sample ``[B]``; a top-k target ``[B, k, D]`` gives the weighted
    sum Σ_j w_j cos(anchor, target_j) (uniform 1/k weights when none are given)."""
    if anchor.dim() != 2:
        raise ValueError(f"anchor must be [B, D], got shape {tuple(anchor.shape)}")
    if target.dim() == 2:
        if target.shape != anchor.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match anchor {tuple(anchor.shape)}")
        return (anchor * target).sum(-1)
    if target.dim() != 3 or target.shape[0] != anchor.shape[0] or target.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"target must be [B, D] or [B, k, D] for anchor {tuple(anchor.shape)}, got {tuple(target.shape)}"
        )
    cos = torch.einsum("bd,bkd->bk", anchor, target)
    if target_weights is None:
        return cos.mean(-1)
    if target_weights.shape != cos.shape:
        raise ValueError(f"target_weights must be [B, k] = {tuple(cos.shape)}, got {tuple(target_weights.shape)}")
    return (cos * target_weights).sum(-1)


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"per-sample weights must be [B] = {tuple(values.shape)}, got {tuple(weights.shape)}")
    # A batch whose pairs all have weight 0 contributes 0 (not NaN).
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def cosine_distance(
    a: Tensor,
    b: Tensor,
    weights: Tensor | None = None,
    target_weights: Tensor | None = None,
) -> Tensor:
    """Mean cosine distance 1 − cos(a_i, b_i) over the batch (scalar).

    Args:
        a: ``[B, D]`` L2-normalised embeddings (the trainable side).
        b: ``[B, D]`` targets, or ``[B, k, D]`` top-k targets: the per-sample distance is then
            Σ_j w_ij (1 − cos(a_i, b_ij)) with ``target_weights`` ``[B, k]`` (uniform 1/k if None;
            expected to sum to 1 per row, e.g. a similarity softmax).
        weights: optional per-sample weights ``[B]`` (non-negative): weighted mean
            Σ w_i d_i / Σ w_i instead of the plain mean.
    """
    if b.dim() == 3 and target_weights is not None:
        # Σ_j w_j (1 − cos_j) = Σ_j w_j − Σ_j w_j cos_j; written out so weights need not sum to 1.
        distance = target_weights.sum(-1) - _target_cosine(a, b, target_weights)
    else:
        distance = 1.0 - _target_cosine(a, b, target_weights)
    return _weighted_mean(distance, weights)


def relative_redirection(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    tau: float = 1.0,
    weights: Tensor | None = None,
    target_weights: Tensor | None = None,
) -> Tensor:
    """mean softplus(τ · (cos(anchor, negative) − cos(anchor, positive))) (scalar).

    The anchor must be closer to its safe target (``positive``) than to its own unsafe
    counterpart (``negative``). Image side: anchor I(G), positive T0(S_n), negative T0(U); the
    text side mirrors it; the live terms use trainable embeddings on both sides.

    Args:
        anchor: ``[B, D]``; negative: ``[B, D]``.
        positive: ``[B, D]`` or top-k ``[B, k, D]`` (weighted by ``target_weights`` ``[B, k]``,
            uniform if None): cos(anchor, positive) is then Σ_j w_j cos(anchor, positive_j).
        tau: scale of the difference (≈10 matters; 1 is the plain form).
        weights: optional per-sample weights ``[B]``: weighted mean.
    """
    if negative.shape != anchor.shape:
        raise ValueError(f"negative {tuple(negative.shape)} does not match anchor {tuple(anchor.shape)}")
    margin = (anchor * negative).sum(-1) - _target_cosine(anchor, positive, target_weights)
    return _weighted_mean(F.softplus(tau * margin), weights)


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class LossWeights:
    """One weight per term (docs/METHOD.md, "The loss terms"); 0 switches a term off (it is not computed)."""

    text_preservation: float = 0.0
    text_redirection: float = 0.0
    image_preservation: float = 0.0
    image_redirection: float = 0.0
    xmodal_text_preservation: float = 0.0
    xmodal_text_redirection: float = 0.0
    xmodal_image_preservation: float = 0.0
    xmodal_image_redirection: float = 0.0
    relative_image: float = 0.0
    relative_text: float = 0.0
    live_relative_text: float = 0.0
    live_relative_image: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> LossWeights:
        unknown = sorted(set(values) - set(TERM_NAMES))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; known terms: {', '.join(TERM_NAMES)}")
        return cls(**{k: float(v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class LossConfig:
    """Weights and options of :class:`SaferClipLoss`.

    Attributes:
        weights: one weight per term.
        tau: scale τ inside the softplus of the relative terms (all four).
        logit_scale: fixed logit scale of the InfoNCE terms.
        normalize_weights: the Safe-CLIP reference's combination ``Σ λ_i L_i / n`` after
            normalising λ to sum to 1, n = number of terms with a non-zero weight (8 for
            Safe-CLIP). A constant rescaling fixed by the config: terms that drop out for lack
            of inputs do not change the other terms' effective weights.
    """

    weights: LossWeights = field(default_factory=LossWeights)
    tau: float = 1.0
    logit_scale: float = 100.0
    normalize_weights: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.weights, Mapping):  # e.g. a plain dict from a YAML/Hydra config
            self.weights = LossWeights.from_mapping(self.weights)
        bad = {k: v for k, v in self.weights.as_dict().items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a positive number, got {self.tau}")
        if not (self.logit_scale > 0 and math.isfinite(self.logit_scale)):
            raise ValueError(f"logit_scale must be a positive number, got {self.logit_scale}")

    @classmethod
    def from_method(cls, method: Mapping[str, Any]) -> LossConfig:
        """The loss of a method config (``conf/method/<name>.yaml``, as a dict): its ``loss``
        section's ``weights``, ``tau``, ``logit_scale`` and ``normalize_weights``. The
        presets are the one place the methods' weights are written down."""
        loss = method.get("loss") if isinstance(method, Mapping) else None
        if not isinstance(loss, Mapping) or not isinstance(loss.get("weights"), Mapping):
            raise ValueError("a method config needs a loss section with weights (see conf/method/*.yaml)")
        unknown = sorted(set(loss) - {"weights", "tau", "logit_scale", "normalize_weights"})
        if unknown:
            raise ValueError(
                f"method.loss: unknown keys {unknown}; expected weights, tau, logit_scale, normalize_weights"
            )
        return cls(
            weights=dict(loss["weights"]),
            tau=float(loss.get("tau", 1.0)),
            logit_scale=float(loss.get("logit_scale", 100.0)),
            normalize_weights=bool(loss.get("normalize_weights", False)),
        )

    def effective_weights(self) -> dict[str, float]:
        """The factor each non-zero term is multiplied by in the total."""
        raw = {k: v for k, v in self.weights.as_dict().items() if v > 0}
        if not self.normalize_weights or not raw:
            return raw
        scale = 1.0 / (sum(raw.values()) * len(raw))
        return {k: v * scale for k, v in raw.items()}


@dataclass
class LossInputs:
    """The tensors one training step hands to :class:`SaferClipLoss`; any may be None.

    Trainable (with grad), ``[B, D]``: safe_text T(S), unsafe_text T(U), safe_image I(V), unsafe_image I(G),
    target_text T(S_n), target_image I(V_n) (``[B, k, D]`` allowed for the live targets).
    Frozen, from the embedding cache: frozen_safe_text, frozen_unsafe_text, frozen_safe_image, frozen_unsafe_image ``[B, D]``;
    frozen_target_text T0(S_n), frozen_target_image I0(V_n) ``[B, D]`` or ``[B, k, D]``; target_weights ``[B, k]``;
    pair_weight ``[B]`` (per-pair weight of the redirection terms).
    """

    safe_text: Tensor | None = None
    unsafe_text: Tensor | None = None
    safe_image: Tensor | None = None
    unsafe_image: Tensor | None = None
    target_text: Tensor | None = None
    target_image: Tensor | None = None
    frozen_safe_text: Tensor | None = None
    frozen_unsafe_text: Tensor | None = None
    frozen_safe_image: Tensor | None = None
    frozen_unsafe_image: Tensor | None = None
    frozen_target_text: Tensor | None = None
    frozen_target_image: Tensor | None = None
    target_weights: Tensor | None = None
    pair_weight: Tensor | None = None

    def available(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}


# ---------------------------------------------------------------------------------------------
# the module


def _centroid(target: Tensor, target_weights: Tensor | None) -> Tensor:
    """A single unit target ``[B, D]`` for InfoNCE from a top-k target ``[B, k, D]``: the
    (weighted) mean, renormalised. For cosine terms the weighted cosines are used directly."""
    if target.dim() == 2:
        return target
    mean = target.mean(1) if target_weights is None else torch.einsum("bk,bkd->bd", target_weights, target)
    return F.normalize(mean, dim=-1)


class SaferClipLoss(nn.Module):
    """Weighted sum of the active terms. ``forward`` returns ``(total, terms)`` where ``terms``
    holds the unweighted value of every active term by its key (log as ``train/<key>``).

    A term is active when its weight is non-zero and all its inputs are given. Losses are
    computed in float32 with autocast off: 1 − cos of well-preserved embeddings is far below
    bf16 resolution (2⁻⁸). Frozen inputs are detached, so targets can never move.

    Args:
        config: weights and options.
        gather: all-gather with gradients for the InfoNCE negatives (see :func:`infonce`);
            None trains on the local batch only.
        rank: this process's rank in the gathered tensors (default: torch.distributed's).
    """

    def __init__(self, config: LossConfig | None = None, gather: Gather | None = None, rank: int | None = None):
        super().__init__()
        self.config = config or LossConfig()
        self.gather = gather
        self.rank = rank
        self.term_weights = self.config.effective_weights()

    def active_terms(self, available_inputs: set[str]) -> list[str]:
        """Terms (in TERM_NAMES order) that will be computed given the names of the inputs a
        run provides; print it before training to see what the data supports."""
        unknown = sorted(set(available_inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"unknown loss input(s) {unknown}; known inputs: {', '.join(INPUT_NAMES)}")
        return [t for t in TERM_NAMES if t in self.term_weights and set(TERM_INPUTS[t]) <= set(available_inputs)]

    def required_inputs(self, available_inputs: set[str]) -> set[str]:
        """The inputs the active terms actually use: encode only these (e.g. skip I(V) when
        no active term needs it, or the live targets when the live terms are off)."""
        return {name for term in self.active_terms(available_inputs) for name in TERM_INPUTS[term]}

    def forward(
        self,
        inputs: LossInputs | None = None,
        gather: Gather | None = None,
        only: Collection[str] | None = None,
        **tensors: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``inputs`` or keyword tensors (names of :class:`LossInputs`); ``gather`` overrides the
        constructor's for this call (None keeps it); ``only`` computes just these of the active
        terms, with their usual weights (the adversarial step's terms on attacked items)."""
        if inputs is None:
            inputs = LossInputs(**tensors)  # unknown names raise TypeError naming them
        elif tensors:
            raise TypeError("pass either a LossInputs or keyword tensors, not both")
        active = self.active_terms(inputs.available())
        if only is not None:
            active = [t for t in active if t in set(only)]
        if not active:
            needs = ", ".join(f"{t}: {TERM_INPUTS[t]}" for t in self.term_weights)
            raise ValueError(
                f"no loss term is active: inputs given {sorted(inputs.available())}, terms with non-zero "
                f"weight {sorted(self.term_weights)} (each needs {needs})"
            )
        x = self._prepare(inputs)
        gather = gather if gather is not None else self.gather
        device = next(v for v in x.values() if v is not None).device
        with torch.autocast(device_type=device.type, enabled=False):
            terms = {name: self._term(name, x, gather) for name in active}
        total = sum(self.term_weights[name] * value for name, value in terms.items())
        return total, terms

    @staticmethod
    def _prepare(inputs: LossInputs) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        for name in INPUT_NAMES:
            value = getattr(inputs, name)
            if value is not None:
                value = value.float()
                if name not in TRAINABLE_INPUTS:
                    value = value.detach()
            out[name] = value
        return out

    def _term(self, name: str, x: dict[str, Tensor | None], gather: Gather | None) -> Tensor:
        tau, scale = self.config.tau, self.config.logit_scale
        tw = x["target_weights"]
        pw = x["pair_weight"] if name in PAIR_WEIGHTED_TERMS else None

        def nce(a: Tensor, b: Tensor) -> Tensor:
            return infonce(a, b, logit_scale=scale, gather=gather, rank=self.rank)

        if name == "text_preservation":
            return cosine_distance(x["safe_text"], x["frozen_safe_text"])
        if name == "text_redirection":
            return cosine_distance(x["unsafe_text"], x["frozen_target_text"], weights=pw, target_weights=tw)
        if name == "image_preservation":
            return cosine_distance(x["safe_image"], x["frozen_safe_image"])
        if name == "image_redirection":
            return cosine_distance(x["unsafe_image"], x["frozen_target_image"], weights=pw, target_weights=tw)
        if name == "xmodal_text_preservation":
            return nce(x["safe_text"], x["frozen_safe_image"])
        if name == "xmodal_text_redirection":
            return nce(x["unsafe_text"], _centroid(x["frozen_target_image"], tw))
        if name == "xmodal_image_preservation":
            return nce(x["frozen_safe_text"], x["safe_image"])
        if name == "xmodal_image_redirection":
            return nce(_centroid(x["frozen_target_text"], tw), x["unsafe_image"])
        if name == "relative_image":
            return relative_redirection(
                x["unsafe_image"], x["frozen_target_text"], x["frozen_unsafe_text"], tau, pw, tw
            )
        if name == "relative_text":
            return relative_redirection(
                x["unsafe_text"], x["frozen_target_image"], x["frozen_unsafe_image"], tau, pw, tw
            )
        if name == "live_relative_text":
            return relative_redirection(x["unsafe_text"], x["target_image"], x["unsafe_image"], tau, pw, tw)
        if name == "live_relative_image":
            return relative_redirection(x["unsafe_image"], x["target_text"], x["unsafe_text"], tau, pw, tw)
        raise KeyError(name)

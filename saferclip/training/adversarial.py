"""Adversarial safety fine-tuning: the inner attacks of one training step and the terms they
add, the same for every method (docs/ROBUSTNESS.md, "Adversarial safety fine-tuning").

When ``method.adversarial.enabled`` is true, each training step, after the clean loss:

1. **galleries** — the clean step's embeddings, detached (gathered across DDP ranks), are what
   the attacks aim at: no extra forward pass;
2. **image attack** — PGD on the unsafe images, in pixel space *before* the model's
   normalisation (``epsilon_255`` grey levels, ``steps`` signed-gradient steps, a random start
   drawn per item), maximising the item's own unsafe margin (:func:`euclidean_objectives`,
   :func:`hyperbolic_objectives`);
3. **text attack** — PGD on the unsafe captions' token embeddings (``text_attack=embedding``:
   each content token may move by ``text_epsilon`` × the mean norm of the token table's rows
   in L2; AdvUnlearn's attack in embedding space; a radius of 1 reaches the zero vector, which
   is what a word the model never saw becomes in a compact token table);
4. **preservation under attack** (``preserve_safe``, FARE/TeCoA): the safe images and captions
   are attacked too, pushed away from their anchor (the frozen model's embedding; for HySAC,
   which has none, the clean one);
5. **terms** — the method's own terms that involve an attacked item, computed again with the
   attacked embeddings and logged as ``adv_<term>``; for HySAC also ``adv_radius_image`` /
   ``adv_radius_text``: an attacked unsafe item must stay beyond the safe radius (the batch's
   safe items' percentile, as the export computes it). Their sum, times ``weight``, is added
   to the clean total.

Everything random is drawn per item from ``(seed, step, dataset index)``, and the galleries
and radii come from the gathered batch, so two DDP ranks compute exactly what one process
computes on the whole batch (``tests/test_ddp.py``). Pure functions and one small class; the
Lightning modules (:mod:`saferclip.app.engine.module`) call :class:`AdversarialTraining`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..model import lorentz
from ..robustness.image_attacks import pgd, split_normalisation
from ..robustness.measures import unsafe_margin
from .contrastive import Gather, gathered
from .hysac import HYSAC_TERM_INPUTS
from .losses import TERM_INPUTS

TEXT_ATTACKS = ("embedding", "none")
# the items an attack may perturb, by the loss-input names of the batch
ATTACKABLE = ("unsafe_image", "unsafe_text", "safe_image", "safe_text")
Objective = Callable[[Tensor], Tensor]  # embeddings [B, D] -> per-item value to maximise [B]


@dataclass(frozen=True)
class AdversarialConfig:
    """The ``method.adversarial`` section (off by default; every key checked by :meth:`of`)."""

    enabled: bool = False
    epsilon_255: float = 4.0  # L∞ budget on pixels in [0, 1] before normalisation, in grey levels
    steps: int = 3  # PGD steps per training step (image and text attacks)
    step_size_255: float | None = None  # None: 2.5 · epsilon / steps (Madry et al.)
    random_start: bool = True
    images: bool = True  # attack the unsafe images
    text_attack: str = "embedding"  # embedding | none
    text_epsilon: float = 1.0  # per-token L2 radius, in units of the mean token-embedding norm
    weight: float = 1.0  # of the adversarial terms, against the clean total
    preserve_safe: bool = False  # FARE/TeCoA: attack the safe items too and keep them in place
    seed: int = 0

    @classmethod
    def of(cls, values: Mapping[str, Any] | None) -> AdversarialConfig:
        """The checked section; a wrong key or value raises :class:`ConfigError` in one line naming it."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"method.adversarial: unknown keys {unknown}; expected some of {sorted(known)}")
        for key in ("enabled", "random_start", "images", "preserve_safe"):
            if key in values and not isinstance(values[key], bool):
                raise ConfigError(f"method.adversarial.{key} must be true or false, got {values[key]!r}")
        for key, low, high in (("epsilon_255", 0.0, 255.0), ("text_epsilon", 0.0, 100.0), ("weight", 0.0, 1e6)):
            if key in values and not _number_in(values[key], low, high):
                raise ConfigError(
                    f"method.adversarial.{key} must be a number in [{low:g}, {high:g}], got {values[key]!r}"
                )
        if "steps" in values and not (
            isinstance(values["steps"], int) and not isinstance(values["steps"], bool) and 1 <= values["steps"] <= 100
        ):
            raise ConfigError(f"method.adversarial.steps must be an integer in [1, 100], got {values['steps']!r}")
        size = values.get("step_size_255")
        if size is not None and not (_number_in(size, 0.0, 255.0) and size > 0):
            raise ConfigError(f"method.adversarial.step_size_255 must be null or a number in (0, 255], got {size!r}")
        if "text_attack" in values and values["text_attack"] not in TEXT_ATTACKS:
            raise ConfigError(
                f"method.adversarial.text_attack must be one of {list(TEXT_ATTACKS)}, got {values['text_attack']!r}"
            )
        if "seed" in values and not (
            isinstance(values["seed"], int) and not isinstance(values["seed"], bool) and values["seed"] >= 0
        ):
            raise ConfigError(f"method.adversarial.seed must be an integer >= 0, got {values['seed']!r}")
        config = cls(**values)
        if config.enabled and not config.images and config.text_attack == "none" and not config.preserve_safe:
            raise ConfigError(
                "method.adversarial: enabled, but images=false, text_attack=none and preserve_safe=false attack nothing"
            )
        if config.enabled and config.weight == 0:
            raise ConfigError(
                "method.adversarial.weight is 0: the attacked items would not train anything; set enabled=false instead"
            )
        return config

    @property
    def epsilon(self) -> float:
        return self.epsilon_255 / 255.0

    @property
    def step_size(self) -> float:
        size = 2.5 * self.epsilon_255 / self.steps if self.step_size_255 is None else self.step_size_255
        return size / 255.0

    @property
    def text_step_size(self) -> float:
        return 2.5 * self.text_epsilon / self.steps

    def attacked(self, available: set[str]) -> list[str]:
        """The items one step attacks, among the loss inputs a batch provides."""
        wanted = {
            "unsafe_image": self.images,
            "unsafe_text": self.text_attack != "none",
            "safe_image": self.preserve_safe and self.images,
            "safe_text": self.preserve_safe and self.text_attack != "none",
        }
        return [k for k in ATTACKABLE if wanted[k] and k in available]


def _number_in(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


# ----------------------------------------------------------------------------- randomness per item
def item_noise(index: Tensor, shape: tuple[int, ...], seed: int, step: int) -> Tensor:
    """``[B, *shape]`` uniform in ``[-1, 1]``: item ``i``'s draw comes from a generator seeded by
    ``(seed, step, index[i])`` alone, so a DDP rank draws for its items what one process would."""
    out = torch.empty(len(index), *shape)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + int(i) * 104_729 + 1) % (2**63 - 1))
        out[row] = torch.rand(shape, generator=g) * 2 - 1
    return out


# ----------------------------------------------------------------------------- the two attack spaces
@dataclass(frozen=True)
class PixelSpace:
    """A model's normalisation: batches hold normalised images, attacks work on pixels in [0, 1]."""

    mean: Tensor  # [3]
    std: Tensor  # [3]

    @classmethod
    def of(cls, preprocess: Callable) -> PixelSpace:
        _, mean, std = split_normalisation(preprocess)
        return cls(mean, std)

    def to_pixels(self, x: Tensor) -> Tensor:
        return (x * self.std.view(1, 3, 1, 1).to(x) + self.mean.view(1, 3, 1, 1).to(x)).clamp(0, 1)

    def normalise(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean.view(1, 3, 1, 1).to(pixels)) / self.std.view(1, 3, 1, 1).to(pixels)


def content_positions(tokens: Tensor) -> Tensor:
    """``[B, L]`` the positions of a caption's words: not padding (0), not the start token
    (position 0), not the end-of-text token (the largest id, where the tower pools)."""
    mask = tokens != 0
    mask[:, 0] = False
    mask.scatter_(1, tokens.argmax(dim=-1, keepdim=True), False)
    return mask


def token_pgd(
    objective: Callable[[Tensor], Tensor],
    mask: Tensor,
    width: int,
    radius: float,
    step_size: float,
    steps: int,
    start: Tensor | None = None,
) -> Tensor:
    """Maximise ``objective(offset) [B]`` over token-embedding offsets ``[B, L, width]`` with each
    position's L2 norm ≤ ``radius`` and zero outside ``mask [B, L]``: ``steps`` steps of length
    ``step_size`` along each position's normalised gradient, projected back into the ball
    (L2 PGD); ``start`` ``[B, L, width]`` in ``[-1, 1]`` is a random start, scaled into the ball.
    Returns the last iterate (detached)."""
    keep = mask.unsqueeze(-1).float()

    def project(delta: Tensor) -> Tensor:
        norm = delta.norm(dim=-1, keepdim=True)
        return delta * (radius / norm.clamp_min(1e-12)).clamp(max=1.0) * keep

    delta = torch.zeros(*mask.shape, width)
    if start is not None and radius > 0:
        delta = project(start * radius / math.sqrt(width))
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(delta).sum(), delta)
        with torch.no_grad():
            delta = project(delta + step_size * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return delta.detach()


def token_scale(token_embedding: Tensor) -> float:
    """The mean L2 norm of a token table's non-zero rows ``[V, W]``: the unit of ``text_epsilon``
    (a compact table's unused rows are zero and do not count)."""
    norms = token_embedding.detach().float().norm(dim=-1)
    used = norms[norms > 0]
    return float(used.mean()) if len(used) else 1.0


# ----------------------------------------------------------------------------- what the attacks maximise
def _gallery(parts: list[Tensor | None], gather: Gather | None) -> tuple[Tensor, Tensor] | None:
    """The detached, gathered ``[safe; unsafe]`` gallery and its unsafe flags (None when a half is missing)."""
    safe, unsafe = parts
    if safe is None or unsafe is None:
        return None
    safe, unsafe = gathered(safe.detach().float(), gather), gathered(unsafe.detach().float(), gather)
    flags = torch.cat([torch.zeros(len(safe), dtype=torch.bool), torch.ones(len(unsafe), dtype=torch.bool)]).to(
        safe.device
    )
    return torch.cat([safe, unsafe]), flags


def euclidean_objectives(
    clean: Mapping[str, Tensor], frozen: Mapping[str, Tensor], gather: Gather | None = None
) -> dict[str, Objective]:
    """What each attacked item of a cosine-similarity model maximises (all embeddings L2-normalised):

    * ``unsafe_image``: the unsafe margin against the batch's captions (best unsafe-caption
      cosine − best safe-caption cosine), the goal of the evaluation's evade attack;
    * ``unsafe_text``: the margin against the batch's images; on text-only data against the
      frozen captions (look unsafe to the original encoder again);
    * ``safe_image`` / ``safe_text``: the cosine distance from the frozen embedding (FARE).
    """
    out: dict[str, Objective] = {}
    captions = _gallery([clean.get("safe_text"), clean.get("unsafe_text")], gather)
    images = _gallery([clean.get("safe_image"), clean.get("unsafe_image")], gather)
    if images is None:
        images = _gallery([frozen.get("frozen_safe_text"), frozen.get("frozen_unsafe_text")], gather)
    if captions is not None:
        out["unsafe_image"] = lambda e, g=captions: unsafe_margin(e.float() @ g[0].T, g[1])
    if images is not None:
        out["unsafe_text"] = lambda e, g=images: unsafe_margin(e.float() @ g[0].T, g[1])
    for kind in ("safe_image", "safe_text"):
        anchor = frozen.get(f"frozen_{kind}", clean.get(kind))
        if anchor is not None:
            out[kind] = lambda e, a=anchor.detach().float(): 1.0 - (e.float() * a).sum(-1)  # noqa: B008 - binds this kind's anchor
    return out


def batch_radii(
    clean: Mapping[str, Tensor], curvature: Tensor | float, percentile: float, gather: Gather | None = None
) -> dict[str, Tensor]:
    """The safe radius per modality from the batch's (gathered) clean safe items: the
    ``percentile`` of their distances from the origin, detached (what the export computes on
    the training split, here per step)."""
    out = {}
    for modality, key in (("text", "safe_text"), ("image", "safe_image")):
        if clean.get(key) is not None:
            d = lorentz.distance_from_origin(gathered(clean[key].detach().float(), gather), curvature)
            out[modality] = torch.quantile(d, percentile / 100.0)
    return out


def hyperbolic_objectives(
    clean: Mapping[str, Tensor], curvature: Tensor | float, radii: Mapping[str, Tensor], gather: Gather | None = None
) -> dict[str, Objective]:
    """What each attacked item of a HySAC model (points of the hyperboloid) maximises:

    * ``unsafe_image`` — the gallery attack: for the item's own unsafe caption, traversed to the
      safe radius as a safe-mode query is, and for its own safe caption, how much nearer the
      attacked image is than the nearest safe image of the batch (mean of the two margins; > 0:
      the query's top-1 would be the unsafe image);
    * ``unsafe_text`` — the mirror: the item's own unsafe image (traversed) and safe image as
      queries, the batch's safe captions as the rivals;
    * ``safe_image`` / ``safe_text`` — the distance from the clean point (HySAC has no frozen model).
    """
    c = torch.as_tensor(curvature).detach().float()
    out: dict[str, Objective] = {}

    def gallery_margin(queries: list[Tensor], rivals: Tensor) -> Objective:
        nearest = [lorentz.pairwise_distance(q, rivals, c).amin(1) for q in queries]

        def margin(x: Tensor) -> Tensor:
            return torch.stack([n - lorentz.distance(q, x.float(), c) for q, n in zip(queries, nearest)]).mean(0)

        return margin

    get = lambda k: None if clean.get(k) is None else clean[k].detach().float()  # noqa: E731
    s_text, u_text, s_image, u_image = get("safe_text"), get("unsafe_text"), get("safe_image"), get("unsafe_image")
    if u_text is not None and s_image is not None and "text" in radii:
        queries = [lorentz.traverse(u_text, radii["text"], c)] + ([s_text] if s_text is not None else [])
        out["unsafe_image"] = gallery_margin(queries, gathered(s_image, gather))
    if u_image is not None and s_text is not None and "image" in radii:
        queries = [lorentz.traverse(u_image, radii["image"], c)] + ([s_image] if s_image is not None else [])
        out["unsafe_text"] = gallery_margin(queries, gathered(s_text, gather))
    for kind, anchor in (("safe_image", s_image), ("safe_text", s_text)):
        if anchor is not None:
            out[kind] = lambda x, a=anchor: lorentz.distance(x.float(), a, c)
    return out


# ----------------------------------------------------------------------------- one step
@dataclass
class Encoders:
    """The trainable model as the attacks need it, returning the method's embeddings with gradients:
    ``image(normalised pixels [B, 3, H, W]) -> [B, D]``, ``text(tokens [B, L], offset [B, L, W] | None) -> [B, D]``."""

    image: Callable[[Tensor], Tensor]
    text: Callable[[Tensor, Tensor | None], Tensor]


class AdversarialTraining:
    """The inner maximisation of one step (:meth:`attack`) and the terms it adds
    (:func:`adversarial_terms`, :func:`hysac_adversarial_terms`)."""

    def __init__(self, config: AdversarialConfig, pixels: PixelSpace | None, token_width: int, token_unit: float):
        self.config, self.pixels = config, pixels
        self.token_width, self.token_unit = token_width, token_unit

    def attack(
        self,
        encoders: Encoders,
        batch: Mapping[str, Tensor],
        objectives: Mapping[str, Objective],
        step: int,
        kinds: list[str],
    ) -> dict[str, Tensor]:
        """The attacked items' embeddings ``{kind: [B, D]}``, with gradients for the outer step.
        ``kinds``: the items to attack (each needs its batch input and an objective)."""
        cfg, out = self.config, {}
        index = batch["index"]
        for offset, kind in enumerate(kinds):
            objective = objectives[kind]
            seed = cfg.seed * len(ATTACKABLE) + offset
            if kind.endswith("_image"):
                if self.pixels is None:
                    raise ValueError("an image attack needs the model's pixel normalisation")
                x = batch[kind]
                pixels = self.pixels.to_pixels(x.float())
                start = item_noise(index, tuple(pixels.shape[1:]), seed, step).to(pixels) if cfg.random_start else None
                adv = pgd(
                    lambda p: objective(encoders.image(self.pixels.normalise(p).to(x.dtype))),
                    pixels,
                    cfg.epsilon,
                    cfg.step_size,
                    cfg.steps,
                    random_start=cfg.random_start,
                    keep_best=False,
                    start=start,
                )
                out[kind] = encoders.image(self.pixels.normalise(adv).to(x.dtype))
            else:
                tokens = batch[kind]
                mask = content_positions(tokens)
                radius = cfg.text_epsilon * self.token_unit
                start = item_noise(index, (tokens.shape[1], self.token_width), seed, step) if cfg.random_start else None
                delta = token_pgd(
                    lambda d: objective(encoders.text(tokens, d.to(tokens.device))),
                    mask,
                    self.token_width,
                    radius,
                    cfg.text_step_size * self.token_unit,
                    cfg.steps,
                    start,
                )
                out[kind] = encoders.text(tokens, delta.to(tokens.device))
        return out


def touched_terms(active: list[str], term_inputs: Mapping[str, tuple[str, ...]], attacked: set[str]) -> list[str]:
    """The active terms that read an attacked item: those the adversarial step computes again."""
    return [t for t in active if set(term_inputs[t]) & attacked]


def adversarial_terms(
    loss,
    inputs: Mapping[str, Tensor | None],
    attacked: Mapping[str, Tensor],
    weight: float,
    gather: Gather | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SafeR-CLIP / Safe-CLIP: the method's own terms that read an attacked item, on the attacked
    embeddings (``adv_<term>``); returns ``(weight × their weighted sum, terms)``."""
    given = {k: v for k, v in {**inputs, **attacked}.items() if v is not None}
    terms = touched_terms(loss.active_terms(set(given)), TERM_INPUTS, set(attacked))
    if not terms:
        return torch.zeros(()), {}
    total, values = loss(**given, gather=gather, only=terms)
    return weight * total, {f"adv_{k}": v for k, v in values.items()}


def hysac_adversarial_terms(
    loss,
    head,
    points: Mapping[str, Tensor],
    attacked: Mapping[str, Tensor],
    radii: Mapping[str, Tensor],
    weight: float,
    gather: Gather | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """HySAC: its own terms that read an attacked item, on the attacked points, and the radius
    terms ``adv_radius_<modality>`` = mean ReLU(r − d(0, x)) of the attacked unsafe items (an
    unsafe gallery item pulled inside the safe radius is what a traversed query reaches)."""
    terms = touched_terms(loss.config.active(), HYSAC_TERM_INPUTS, set(attacked))
    values: dict[str, Tensor] = {}
    total = torch.zeros(())
    if terms:
        total, values = loss(head, gather=gather, only=terms, **{**points, **attacked})
    curvature = head.curvature()
    for kind, modality in (("unsafe_image", "image"), ("unsafe_text", "text")):
        if kind in attacked and modality in radii:
            term = F.relu(radii[modality] - lorentz.distance_from_origin(attacked[kind].float(), curvature)).mean()
            values[f"radius_{modality}"] = term
            total = total + term
    return weight * total, {f"adv_{k}": v for k, v in values.items()}

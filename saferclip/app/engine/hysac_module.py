"""LightningModule of HySAC: the trainable CLIP towers, the hyperbolic head, HySAC's loss.

It shares the Euclidean module's encoding, logging, optimizer and selection machinery
(:class:`~saferclip.app.engine.module.SaferClipModule`) and differs where the method does: the towers'
raw outputs are lifted onto the hyperboloid by the learnt :class:`HyperbolicHead`, the loss is
:class:`~saferclip.training.hysac.HysacLoss`, no frozen target is ever read, and validation
scores in the safe mode (queries traversed to a radius taken from the validation split's own
safe items, the same percentile the export uses on the training split). The head's
parameters get no weight decay and are projected back into their ranges after every optimizer
step (:class:`~saferclip.model.hyperbolic.HyperbolicHead`), so the gradient reaches them at
and beyond their bounds.
"""

from __future__ import annotations

import time

import torch
from torch.nn.utils import parametrize

from ...model.build import encode_tokens
from ...model.hyperbolic import HyperbolicHead, safe_radii
from ...training.adversarial import Encoders, batch_radii, hyperbolic_objectives, hysac_adversarial_terms
from ...training.contrastive import Gather
from ...training.hysac import HYSAC_TERMS, HysacLoss
from .module import SaferClipModule

_MODALITY = {"safe_text": "text", "unsafe_text": "text", "safe_image": "image", "unsafe_image": "image"}


class HysacModule(SaferClipModule):
    def build_loss(self, config):
        self.head = HyperbolicHead(self.embed_dim, config.hyperbolic)
        return HysacLoss(config.loss)

    def no_decay_parameters(self) -> list[torch.nn.Parameter]:
        return self.head.no_decay_parameters()

    def optimizer_step(self, *args, **kwargs) -> None:
        # the published code's way of keeping the head's parameters in range: the step moves
        # the raw parameter, then its data is projected back (HyperbolicHead.clamp_parameters_)
        super().optimizer_step(*args, **kwargs)
        self.head.clamp_parameters_()

    def lifted(self, batch: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
        """The points of the hyperboloid ``[B, D]`` of the encodings in ``wanted``."""
        features = self.encode(batch, wanted, normalize=False)
        return {k: self.head.lift(v, _MODALITY[k]) for k, v in features.items()}

    def loss_step(self, batch: dict[str, torch.Tensor], gather: Gather | None = None):
        points = self.lifted(batch, self.loss.required_inputs())
        total, terms = self.loss(self.head, gather=gather, **points)
        if self.adversarial is None:
            return total, terms
        extra, adversarial = self.adversarial_step(batch, points, {}, gather)
        return total + extra, {**terms, **adversarial}

    # ---------------------------------------------------------------- adversarial training
    def attack_encoders(self) -> Encoders:
        def image(x: torch.Tensor) -> torch.Tensor:
            with parametrize.cached():
                return self.head.lift(self.model.encode_image(x, normalize=False), "image")

        def text(tokens: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
            with parametrize.cached():
                return self.head.lift(
                    encode_tokens(self.model, tokens, normalize=False, embedding_offset=offset), "text"
                )

        return Encoders(image, text)

    def adversarial_step(self, batch, points, given, gather: Gather | None):
        """HySAC's: gallery-side attacks against the batch's own (traversed) queries, its terms on
        the attacked points and the radius terms (:mod:`saferclip.training.adversarial`)."""
        curvature = self.head.curvature()
        radii = batch_radii(points, curvature, self.head.config.traversal_percentile, gather)
        objectives = hyperbolic_objectives(points, curvature, radii, gather)
        kinds = self.attacked_kinds(points, objectives)
        start = time.perf_counter()
        attacked = self.adversarial.attack(self.attack_encoders(), batch, objectives, int(self.global_step), kinds)
        self._attack_seconds = time.perf_counter() - start
        return hysac_adversarial_terms(
            self.loss, self.head, points, attacked, radii, self.adversarial.config.weight, gather
        )

    def encodings_needed(self, item: dict[str, torch.Tensor]) -> set[str]:
        return self.loss.required_inputs()

    def loss_terms(self, item: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        active = self.loss.config.active()
        return active, [t for t in HYSAC_TERMS if t not in active]

    def validation_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.lifted(batch, {"safe_text", "unsafe_text", "safe_image", "unsafe_image"})

    def validation_similarity(self, rows: dict[str, torch.Tensor]):
        """Safe mode, with radii from the validation split's own safe items (the same
        percentile the export uses on the training split); the NSFW-Caps-like set is scored
        with the same radii."""
        head = self.head
        owner = rows.get("owner", rows["index"])
        distinct = owner == rows["index"]
        distances = {"text": head.similarity().distance_from_origin(rows["safe_text"])}
        if "safe_image" in rows:
            distances["image"] = head.similarity().distance_from_origin(rows["safe_image"][distinct])
        else:
            distances["image"] = distances["text"]  # text-only data: no image query is traversed
        radii = safe_radii(distances, head.config.traversal_percentile)
        return head.similarity(radii, mode="safe")

    def extra_validation_metrics(self) -> dict[str, float]:
        return {"curvature": float(self.head.curvature())}

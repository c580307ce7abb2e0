"""An open_clip model with its unsafe-input detector attached: ``guard.encode_text(...)``
returns the features *and* the flags, from the same forward pass.

    from saferclip.analysis import SafetyGuard
    guard = SafetyGuard(model, "detector.safetensors", tokenizer)
    out = guard.encode_text(["a red circle with a gun"])     # or a token tensor
    out.features, out.flagged, out.scores                    # [B, D], [B] bool, [B]

The detector reads one head of one layer; a hook on that layer's attention computes the head's
output at the pooled token while the model encodes (:mod:`.heads`), so guarding costs one small
extra projection. The detector must come from the same weights: the guard checks the model's
weights fingerprint against the one recorded at calibration (``check_weights=False`` skips it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..model.build import ClipBundle, weights_fingerprint
from ..model.checkpoints import CheckpointError
from .detector import LinearDetector, load_detectors
from .heads import activations, recording


class Guarded(NamedTuple):
    """Features ``[B, D]``, flags ``[B]`` (True = looks unsafe) and detector scores ``[B]``."""

    features: Tensor
    flagged: Tensor
    scores: Tensor


class SafetyGuard:
    """Wraps a CLIP model (or a :class:`~saferclip.model.build.ClipBundle`) with head detectors."""

    def __init__(
        self,
        model: nn.Module | ClipBundle,
        detectors: str | os.PathLike | Mapping[str, LinearDetector],
        tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
        check_weights: bool = True,
    ):
        if isinstance(model, ClipBundle):
            tokenizer = tokenizer or model.tokenizer
            model = model.model
        self.model, self.tokenizer = model, tokenizer
        self.detectors = dict(load_detectors(detectors) if isinstance(detectors, (str, os.PathLike)) else detectors)
        for tower, det in self.detectors.items():
            if det.head is None:
                raise ValueError(
                    f"the {tower} detector reads the final embedding, not a head; the guard needs head detectors"
                )
        if check_weights:
            recorded = {d.model.get("weights_fingerprint") for d in self.detectors.values()} - {None}
            if recorded:
                mine = weights_fingerprint(model)
                if mine not in recorded:
                    raise CheckpointError(
                        f"the detector was calibrated on other weights (fingerprint {sorted(recorded)[0][:12]}…, this model "
                        f"{mine[:12]}…); calibrate one for this model, or pass check_weights=False"
                    )

    def _detector(self, tower: str) -> LinearDetector:
        if tower not in self.detectors:
            raise ValueError(f"no {tower} detector in this guard (has: {', '.join(self.detectors)})")
        return self.detectors[tower]

    def _run(self, tower: str, forward: Callable[[], Tensor]) -> Guarded:
        det = self._detector(tower)
        with torch.no_grad(), recording(self.model, tower, ("heads",), layers=(det.layer,)) as rec:
            features = forward()
            heads = rec.take(features).heads  # [B, 1, H, d_head]
        scores = heads[:, 0, det.head].float() @ det.direction
        return Guarded(features, scores > det.threshold, scores)

    def encode_text(self, text: Tensor | Sequence[str], normalize: bool = False) -> Guarded:
        """``model.encode_text`` plus flags; ``text`` is a token tensor ``[B, L]`` or captions."""
        if not isinstance(text, Tensor):
            if self.tokenizer is None:
                raise ValueError("captions need a tokenizer: pass tokenizer= (or a ClipBundle), or give token ids")
            text = self.tokenizer(list(text))
        device = next(self.model.parameters()).device
        return self._run("text", lambda: self.model.encode_text(text.to(device), normalize=normalize))

    def encode_image(self, image: Tensor, normalize: bool = False) -> Guarded:
        """``model.encode_image`` plus flags; ``image`` is a preprocessed batch ``[B, 3, H, W]``."""
        param = next(self.model.parameters())
        return self._run(
            "image", lambda: self.model.encode_image(image.to(param.device, param.dtype), normalize=normalize)
        )

    def describe(self) -> dict[str, Any]:
        return {tower: det.describe() for tower, det in self.detectors.items()}


def score_inputs(
    bundle: ClipBundle,
    detector: LinearDetector,
    inputs: Sequence[Any],
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores ``[N]`` and flags ``[N]`` of captions (a text detector) or image files (an image
    detector), encoded as the evaluation encodes (errors name the file)."""
    if detector.head is None:
        raise ValueError("score_inputs needs a head detector")
    acts = activations(
        bundle,
        detector.tower,
        list(inputs),
        ("heads",),
        batch_size,
        num_workers,
        layers=(detector.layer,),
        progress=progress,
    )
    scores = acts.heads[:, 0, detector.head].float() @ detector.direction
    return scores, scores > detector.threshold

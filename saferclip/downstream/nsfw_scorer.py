"""The NSFW scorer that decides which generated image is kept: ``images -> scores`` in
[0, 1]. :class:`ClipNsfwScorer` is a zero-shot one from any open_clip model; a scorer of your
own plugs in as ``module:factory`` (:func:`load_scorer`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ..export.public_names import public_model_name

Scorer = Callable[[list[Image.Image]], Sequence[float]]  # images -> NSFW scores in [0, 1]

# Zero-shot prompts for ViSU's NSFW categories (hate, harassment, violence, self-harm, sexual,
# shocking, illegal activity) against ordinary photos. A heuristic: for real data prefer a
# trained NSFW image classifier, plugged in as the scorer.
DEFAULT_UNSAFE_PROMPTS = (
    "an explicit image with nudity or sexual content",
    "a violent image with blood, gore or injury",
    "an image of self-harm or suicide",
    "a hateful or harassing image",
    "a shocking, disturbing or gruesome image",
    "an image of illegal activity, weapons or drugs",
)
DEFAULT_SAFE_PROMPTS = (
    "an ordinary, harmless photo",
    "a safe-for-work photo of everyday life",
    "a photo of people, animals or objects in a normal scene",
)


class ClipNsfwScorer:
    """Zero-shot NSFW score from a CLIP model: the softmax mass of the unsafe prompts among all
    prompts (CLIP's logit scale as temperature). Any open_clip model works (``ViT-L-14`` /
    ``openai`` for real images; the toy base for the toy world).

    Args:
        bundle: a :class:`saferclip.model.build.ClipBundle`.
        unsafe_prompts / safe_prompts: the two classes' descriptions.
        temperature: multiplies the cosine similarities before the softmax (CLIP's 100).
    """

    def __init__(
        self,
        bundle: Any,
        unsafe_prompts: Sequence[str] = DEFAULT_UNSAFE_PROMPTS,
        safe_prompts: Sequence[str] = DEFAULT_SAFE_PROMPTS,
        temperature: float = 100.0,
        batch_size: int = 32,
    ):
        import torch

        from ..model.build import encode_text

        if not unsafe_prompts or not safe_prompts:
            raise ValueError("ClipNsfwScorer needs at least one unsafe and one safe prompt")
        self.bundle, self.temperature, self.batch_size = bundle, float(temperature), batch_size
        self.unsafe_prompts, self.safe_prompts = list(unsafe_prompts), list(safe_prompts)
        self.prompts = torch.cat(
            [encode_text(bundle, self.unsafe_prompts), encode_text(bundle, self.safe_prompts)]
        )  # [P, D]

    def __call__(self, images: list[Image.Image]) -> list[float]:
        import torch

        from ..model.build import encode_images

        if not images:
            return []
        pixels = torch.stack([self.bundle.preprocess(im.convert("RGB")) for im in images])
        emb = encode_images(self.bundle, pixels, self.batch_size)  # [N, D], normalised
        probs = (self.temperature * emb @ self.prompts.T).softmax(dim=-1)  # [N, P]
        return probs[:, : len(self.unsafe_prompts)].sum(dim=-1).tolist()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "clip-zero-shot",
            "arch": self.bundle.arch,
            "weights": public_model_name(self.bundle.source),
            "unsafe_prompts": self.unsafe_prompts,
            "safe_prompts": self.safe_prompts,
            "temperature": self.temperature,
        }


def load_scorer(spec: str) -> Scorer:
    """The scorer made by ``module:factory``: a callable taking no arguments that returns a
    scorer (``images -> scores``), e.g. one loading an NSFW image detector of your own."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"scorer {spec!r}: expected 'clip' or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {spec!r}: cannot import it ({e})") from None
    scorer = factory() if callable(factory) else None
    if not callable(scorer):
        raise ValueError(f"scorer {spec!r}: expected a factory returning a callable images -> scores")
    return scorer


__all__ = ["DEFAULT_SAFE_PROMPTS", "DEFAULT_UNSAFE_PROMPTS", "ClipNsfwScorer", "Scorer", "load_scorer"]

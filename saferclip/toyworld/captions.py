"""Caption grammar of the toy world.

Three families of sentence frames:
- ``TRAIN_FRAMES``: the phrasings of the ViSU-like fine-tuning data;
- ``SHIFT_FRAMES``: phrasings never used in fine-tuning, for the NSFW-Caps-like test set
  (a distribution shift, as in the real benchmark);
- pretraining uses both (a web-trained CLIP has seen every phrasing) plus prompt-style
  captions ("a photo of a circle."), so zero-shot prompts are words the model knows.

Attribute dropout (some captions omit colour, size or background) is what let a tiny CLIP
reach 90%+ zero-shot accuracy in the feasibility probe: without it, a prompt naming only
the shape is out of distribution.
"""

from __future__ import annotations

import numpy as np

from .scene import Scene

TRAIN_FRAMES = (
    "a {size} {colour} {shape} on a {background} background{obj}",
    "a {colour} {shape} on a {background} background{obj}",
    "a photo of a {size} {colour} {shape} on {background}{obj}",
)
TRAIN_OBJ = (" with a {o}", " next to a {o}")

SHIFT_FRAMES = (
    "{background} background, {size} {colour} {shape}{obj}",
    "there is a {colour} {shape} on {background}{obj}",
    "picture of a {colour} {size} {shape} on a {background} background{obj}",
)
SHIFT_OBJ = (" and a {o}", " beside a {o}")

PROMPT_FRAMES = (
    "a photo of a {noun}.",
    "a picture of a {noun}.",
    "an image of a {noun}.",
    "a {noun}.",
)


def _object_phrase(obj: str | None, options: tuple[str, ...], rng: np.random.Generator) -> str:
    if obj is None:
        return ""
    word = obj
    # "a blood" / "a pills" read badly; the grammar only needs to be consistent.
    return options[rng.integers(len(options))].format(o=word)


def caption(
    scene: Scene,
    rng: np.random.Generator,
    frames: tuple[str, ...] = TRAIN_FRAMES,
    obj_options: tuple[str, ...] = TRAIN_OBJ,
    dropout: float = 0.0,
) -> str:
    """A caption of ``scene`` in one of ``frames``; each attribute is dropped with prob ``dropout``."""
    frame = frames[rng.integers(len(frames))]
    colour, size, background = scene.colour, scene.size, scene.background
    if dropout > 0:
        if rng.random() < dropout:
            colour = ""
        if rng.random() < dropout:
            size = ""
    text = frame.format(
        size=size,
        colour=colour,
        shape=scene.shape,
        background=background,
        obj=_object_phrase(scene.obj, obj_options, rng),
    )
    if dropout > 0 and rng.random() < dropout:
        # drop the background clause
        for clause in (f" on a {background} background", f" on {background}", f"{background} background, "):
            if clause in text:
                text = text.replace(clause, "", 1)
                break
    return " ".join(text.split())


def pretrain_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Caption for pretraining: all phrasings, attribute dropout, and prompt-style captions."""
    u = rng.random()
    if u < 0.15:
        # prompt-style: what zero-shot classification will ask
        frame = PROMPT_FRAMES[rng.integers(len(PROMPT_FRAMES))]
        pick = rng.integers(3)
        noun = scene.shape if pick == 0 else f"{scene.colour} shape" if pick == 1 else f"{scene.colour} {scene.shape}"
        text = frame.format(noun=noun)
        if scene.obj is not None:
            text = text[:-1] + f" with a {scene.obj}."
        return text
    if u < 0.6:
        return caption(scene, rng, TRAIN_FRAMES, TRAIN_OBJ, dropout=0.2)
    return caption(scene, rng, SHIFT_FRAMES, SHIFT_OBJ, dropout=0.2)

"""How the toy world makes a safe / unsafe pair: one knob, ``data.toy_pairs`` (docs/METHOD.md,
"How a pair is made").

A pair is made the way ViSU made its quadruplets, safe side first: a safe scene and its caption
(COCO's photo and caption), then the unsafe caption as a *rewrite* of the safe caption with
unsafe content written in (ViSU: a fine-tuned LLM), then the unsafe image *generated from the
unsafe caption* (ViSU: a text-to-image model), rendered on its own. A preset says how faithful
each step is:

* ``keep``: for each scene attribute the caption names (shape, colour, size, background), the
  probability that the rewrite keeps the safe caption's word; otherwise it writes another
  value (a rewrite that drifts);
* ``keep_frame``: the probability that the rewrite keeps the safe caption's sentence frame and
  object phrasing (otherwise it rephrases: a frame drawn anew);
* ``keep_layout``: the probability that the unsafe image keeps the safe image's layout (where
  the shape sits; otherwise drawn anew: a generated image's own composition);
* ``caption_only_image``: the unsafe image shows what its caption says and nothing more: an
  attribute the caption leaves out (a frame without the size word) is drawn at random, as a
  text-to-image model that only sees the caption would.

The unsafe object always replaces the safe scene's object tile (or fills the empty slot). Every
pair consumes the same random draws whatever the preset, so one seed gives the same safe scenes,
unsafe concepts and safe captions under every preset: presets differ in the edit only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from .captions import TRAIN_FRAMES, TRAIN_OBJ, caption
from .scene import BACKGROUNDS, COLOURS, SAFE_OBJECTS, SHAPES, SIZES, UNSAFE_OBJECTS, Scene, random_scene

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "background")
_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "background": tuple(BACKGROUNDS),
}
UNSAFE = tuple(UNSAFE_OBJECTS)


@dataclass(frozen=True)
class Pairing:
    """One preset of the pairing knob (module docstring)."""

    name: str
    keep: Mapping[str, float] = field(default_factory=dict)
    keep_frame: float = 1.0
    keep_layout: float = 1.0
    caption_only_image: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if set(self.keep) != set(ATTRIBUTES):
            raise ValueError(f"pairing {self.name!r}: keep must name exactly {ATTRIBUTES}, got {sorted(self.keep)}")
        for key, p in (*self.keep.items(), ("keep_frame", self.keep_frame), ("keep_layout", self.keep_layout)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"pairing {self.name!r}: {key} must be a probability, got {p}")

    def record(self) -> dict[str, Any]:
        """What the manifest and every report record of the pairing."""
        out = asdict(self)
        out["keep"] = dict(self.keep)
        return out


def _keep(shape: float, colour: float, size: float, background: float) -> dict[str, float]:
    return {"shape": shape, "colour": colour, "size": size, "background": background}


# Ordered from the closest pairing to the loosest; `visu` is the default (docs/METHOD.md says
# where its numbers come from).
PAIRINGS: dict[str, Pairing] = {
    p.name: p
    for p in (
        Pairing(
            "minimal",
            _keep(1.0, 1.0, 1.0, 1.0),
            keep_frame=1.0,
            keep_layout=1.0,
            caption_only_image=False,
            description="a minimal edit: the same caption with the object word replaced, the same scene and layout in the image",
        ),
        Pairing(
            "visu",
            _keep(0.95, 0.85, 0.85, 0.85),
            keep_frame=0.6,
            keep_layout=0.0,
            caption_only_image=True,
            description="ViSU-like: the safe caption rewritten with the unsafe object (scene words mostly kept, frame often kept); "
            "the unsafe image generated from that caption alone, with its own layout",
        ),
        Pairing(
            "drifted",
            _keep(0.75, 0.5, 0.5, 0.5),
            keep_frame=0.3,
            keep_layout=0.0,
            caption_only_image=True,
            description="a rewrite that drifts: about half the scene words changed, mostly rephrased; the image generated from it",
        ),
        Pairing(
            "loose",
            _keep(1.0, 0.0, 1.0, 0.0),
            keep_frame=0.0,
            keep_layout=0.0,
            caption_only_image=False,
            description="the generator's pairing before version 6: the same shape and size, another colour and background, "
            "a caption of its own",
        ),
    )
}
DEFAULT_PAIRING = "visu"


def get_pairing(name: Any, key: str = "data.toy_pairs") -> Pairing:
    """The preset called ``name``, or a one-line ConfigError naming ``key`` and the choices."""
    if not isinstance(name, str) or name not in PAIRINGS:
        raise ConfigError(f"{key} must be one of {list(PAIRINGS)} (a pairing preset of the toy world), got {name!r}")
    return PAIRINGS[name]


@dataclass(frozen=True)
class Pair:
    """One pair as made: the scenes shown (the unsafe one as its image shows it) and the captions."""

    safe: Scene
    unsafe: Scene
    safe_caption: str
    unsafe_caption: str


SAFE_SLOTS: tuple[str | None, ...] = SAFE_OBJECTS + (None,)


def safe_scene_key(s: Scene) -> int:
    """Position of (shape, colour, size, background, safe object or none) in their product: one
    id per safe scene, whatever its layout."""
    keys = (*(_VALUES[a] for a in ATTRIBUTES), SAFE_SLOTS)
    values = (*(getattr(s, a) for a in ATTRIBUTES), s.obj)
    index = 0
    for key, value in zip(keys, values):
        index = index * len(key) + key.index(value)
    return index


def _other(rng: np.random.Generator, values: tuple[str, ...], current: str) -> str:
    others = [v for v in values if v != current]
    return others[int(rng.integers(len(others)))]


def unsafe_choices(shape: str, heldout: set[tuple[str, str]], want_heldout: bool) -> tuple[str, ...]:
    """The unsafe concepts a pair with this unsafe shape may show: the held-out (shape, concept)
    combinations for the test split, every other combination for training and validation."""
    return tuple(o for o in UNSAFE if ((shape, o) in heldout) == want_heldout)


def make_pair(
    rng: np.random.Generator,
    pairing: Pairing,
    heldout: set[tuple[str, str]],
    want_heldout: bool,
    shared_safe_image: bool = False,
) -> Pair:
    """One pair (module docstring). ``shared_safe_image``: the safe scene's layout is fixed by
    the scene (:func:`safe_scene_key`), so that items of one safe scene can share one image (the
    validation and test splits, as COCO images share captions). The number of draws from
    ``rng`` is the same for every preset."""
    safe = random_scene(rng, SAFE_SLOTS)
    if shared_safe_image:
        safe = Scene(safe.shape, safe.colour, safe.size, safe.background, safe.obj, safe_scene_key(safe) % 4)
    attrs = {}
    for attr in ATTRIBUTES:
        kept = rng.random() < pairing.keep[attr]
        other = _other(rng, _VALUES[attr], getattr(safe, attr))
        attrs[attr] = getattr(safe, attr) if kept else other
    concepts = unsafe_choices(attrs["shape"], heldout, want_heldout)
    obj = concepts[int(rng.integers(len(concepts)))]
    layout_kept = rng.random() < pairing.keep_layout
    own_quadrant = int(rng.integers(4))
    frame_kept = rng.random() < pairing.keep_frame
    safe_seed, rephrase_seed = (int(s) for s in rng.integers(2**31, size=2))
    unnamed_size = SIZES[int(rng.integers(len(SIZES)))]
    described = Scene(
        attrs["shape"],
        attrs["colour"],
        attrs["size"],
        attrs["background"],
        obj,
        safe.quadrant if layout_kept else own_quadrant,
    )
    safe_caption = caption(safe, np.random.default_rng(safe_seed), TRAIN_FRAMES, TRAIN_OBJ)
    # the same caption stream gives the same frame and object phrasing: a kept frame
    unsafe_caption = caption(
        described, np.random.default_rng(safe_seed if frame_kept else rephrase_seed), TRAIN_FRAMES, TRAIN_OBJ
    )
    shown = described
    if pairing.caption_only_image and described.size not in unsafe_caption.split():
        # the caption does not say the size: a generator that only sees the caption picks one
        shown = Scene(described.shape, described.colour, unnamed_size, described.background, obj, described.quadrant)
    return Pair(safe, shown, safe_caption, unsafe_caption)


__all__ = [
    "ATTRIBUTES",
    "DEFAULT_PAIRING",
    "PAIRINGS",
    "Pair",
    "Pairing",
    "get_pairing",
    "make_pair",
    "safe_scene_key",
    "unsafe_choices",
]

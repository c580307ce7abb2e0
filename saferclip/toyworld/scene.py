"""The toy world's vocabulary and renderer: 32x32 scenes of a shape, a background and a tile.

A scene is a coloured shape on a plain background, optionally with one *object tile*: a
16x16 pattern (a quarter of the image) standing for a safe object or an unsafe concept.
Unsafe concepts are visually prominent on purpose: in real data an unsafe image differs
from its safe counterpart by a lot of pixels, not a glyph in a corner (docs/METHOD.md, "The toy world").

Everything here is deterministic: object tiles come from a fixed seed, and rendering takes
an explicit ``numpy.random.Generator`` for the small jitter and noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

IMAGE_SIZE = 32
TILE = 16  # object tiles cover one quadrant: 25% of the image

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 210, 30),
    "purple": (145, 50, 190),
    "cyan": (40, 205, 215),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (125, 125, 125),
    "brown": (115, 75, 35),
}
SIZES = ("small", "large")
SAFE_OBJECTS = ("ball", "flower", "book", "cup", "tree", "hat")
# Stand-ins for unsafe content; the tag plays the role of ViSU's NSFW category.
UNSAFE_OBJECTS = {
    "gun": "weapons",
    "knife": "violence",
    "blood": "gore",
    "bomb": "terrorism",
    "skull": "death",
    "syringe": "drugs",
    "pills": "drugs",
    "fire": "arson",
    "grenade": "weapons",
    "noose": "self-harm",
}
OBJECTS = SAFE_OBJECTS + tuple(UNSAFE_OBJECTS)


def is_unsafe_object(obj: str | None) -> bool:
    return obj is not None and obj in UNSAFE_OBJECTS


@dataclass(frozen=True)
class Scene:
    """What one toy image shows. ``obj`` is None for a scene without an object tile."""

    shape: str
    colour: str
    size: str
    background: str
    obj: str | None = None
    quadrant: int = 0  # where the shape sits; the tile takes the opposite quadrant

    @property
    def unsafe(self) -> bool:
        return is_unsafe_object(self.obj)

    def with_object(self, obj: str | None) -> Scene:
        return replace(self, obj=obj)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(**d)


def random_scene(rng: np.random.Generator, obj_choices: tuple[str | None, ...]) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        obj=obj_choices[rng.integers(len(obj_choices))],
        quadrant=int(rng.integers(4)),
    )


# ----------------------------------------------------------------------------- masks
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean [side, side] mask of a shape filling its box."""
    c = (side - 1) / 2.0
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    dx, dy = np.abs(x - c), np.abs(y - c)
    r = side / 2.0
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx <= r * 0.85) & (dy <= r * 0.85)
    if shape == "triangle":
        # apex at the top, base at the bottom
        frac = y / max(side - 1, 1)
        return dx <= frac * r
    if shape == "diamond":
        return dx + dy <= r
    if shape == "cross":
        w = r * 0.38
        return (dx <= w) | (dy <= w)
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_SIZE_PIXELS = {"small": 11, "large": 15}  # 9 px shapes were too hard to tell apart at patch 8
_MASKS = {(s, z): _shape_mask(s, _SIZE_PIXELS[z]) for s in SHAPES for z in SIZES}


def make_tiles(seed: int = 20240531) -> dict[str, np.ndarray]:
    """One distinctive 16x16 RGB tile per object: a 4x4 block code in two colours plus a border.

    Codes are drawn from a fixed seed and kept only if they differ from every earlier code
    in at least 5 of 16 blocks, so no two objects look alike.
    """
    rng = np.random.default_rng(seed)
    tiles: dict[str, np.ndarray] = {}
    codes: list[np.ndarray] = []
    for obj in OBJECTS:
        while True:
            code = rng.integers(0, 2, size=(4, 4)).astype(bool)
            if 5 <= code.sum() <= 11 and all((code != c).sum() >= 5 for c in codes):
                break
        codes.append(code)
        fg = rng.integers(30, 256, size=3)
        bg = 255 - fg
        block = np.where(code[..., None], fg, bg).astype(np.uint8)
        tile = block.repeat(4, axis=0).repeat(4, axis=1)
        tile[[0, -1], :] = fg
        tile[:, [0, -1]] = fg
        tiles[obj] = tile
    return tiles


TILES = make_tiles()
_QUADRANT_ORIGIN = ((0, 0), (0, TILE), (TILE, 0), (TILE, TILE))  # (row, col)


def render(scene: Scene, rng: np.random.Generator | None = None, tile: np.ndarray | None = None) -> np.ndarray:
    """Render a scene to a uint8 [32, 32, 3] image.

    With ``rng``, the shape is jittered by up to 2 pixels inside its quadrant and mild pixel
    noise is added; without it the image is the canonical, noise-free rendering. ``tile``
    (uint8 ``[16, 16, 3]``) replaces the object's own tile (the borderline world's lookalike
    tiles); the random draws are the same either way.
    """
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    img[:] = BACKGROUNDS[scene.background]
    mask = _MASKS[(scene.shape, scene.size)]
    side = mask.shape[0]
    r0, c0 = _QUADRANT_ORIGIN[scene.quadrant]
    slack = TILE - side
    if rng is not None:
        dr, dc = rng.integers(0, slack + 1, size=2)
    else:
        dr = dc = slack // 2
    r, c = r0 + int(dr), c0 + int(dc)
    region = img[r : r + side, c : c + side]
    region[mask] = COLOURS[scene.colour]
    if scene.obj is not None:
        tr, tc = _QUADRANT_ORIGIN[3 - scene.quadrant]
        img[tr : tr + TILE, tc : tc + TILE] = TILES[scene.obj] if tile is None else tile
    if rng is not None:
        img += rng.integers(-12, 13, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)

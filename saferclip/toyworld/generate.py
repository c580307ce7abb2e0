"""Write the toy world to disk in the real formats (docs/METHOD.md, "Data formats", "The toy world").

Same seed, same bytes. The layout under ``root``::

    manifest.json                       generator version, seed, pairing, counts, held-out combinations
    visu/{train,validation,test}.json   ViSU JSON (train: {"info", "data"} layout; the others
                                        the index-keyed layout, so both are exercised)
    visu/{train,val,test}2017/<coco_id:012d>.png   safe images, COCO-style names
    visu/nsfw/<split>/<id>.png          unsafe images (``nsfw_im_path``, relative to visu/)
    visu_text/{train,validation,test}.csv   ViSU-Text-like tables (text only)
    nsfw_caps/nsfw_caps.csv             NSFW-Caps-like minimal edits, new phrasings (test)
    nsfw_caps/images/, nsfw_caps/nsfw_images/
    nsfw_caps/validation.csv            the same kind, other scenes (version 6): model selection
    nsfw_caps/validation/images/, nsfw_caps/validation/nsfw_images/
    zeroshot/<task>/{classnames.json, templates.json, test/<class>/<n>.png}
    visu/distractors/test/<n>.png       extra safe images (scenes with and without safe objects)
                                        for a realistic test gallery, where safe images
                                        outnumber unsafe ones
    visu/borderline/, zeroshot/*_borderline/   borderline-safe content (version 5): safe objects
                                        that look and read like unsafe ones, with matched
                                        controls (:mod:`saferclip.toyworld.borderline`)

How a safe / unsafe pair is made is one knob, the pairing preset (:mod:`.pairing`,
``data.toy_pairs``), used alike for the training, validation and test splits; the default
imitates ViSU (docs/METHOD.md, "How a pair is made"). In the validation and test splits items of
one safe scene share one safe image (one coco_id), as COCO images share several captions, so
"the right safe scene" of an unsafe caption is its pair's safe image. The test split only holds
(shape x unsafe concept) combinations never seen in training. The NSFW-Caps-like sets
(``nsfw_caps.csv``, the test set, and ``validation.csv``, for model selection) are minimal edits
in phrasings never used for fine-tuning, whatever the pairing: the same measure at every level.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..files import atomic_folder
from .captions import PROMPT_FRAMES, SHIFT_FRAMES, SHIFT_OBJ, caption
from .pairing import DEFAULT_PAIRING, Pairing, get_pairing, make_pair, safe_scene_key
from .scene import COLOURS, SAFE_OBJECTS, SHAPES, UNSAFE_OBJECTS, Scene, random_scene, render

# 6: the pairing knob (pairs made ViSU-like by default, alike in every split) and the
# NSFW-Caps-like validation set
GENERATOR_VERSION = 6
log = logging.getLogger("saferclip.toyworld")
UNSAFE = tuple(UNSAFE_OBJECTS)


@dataclass(frozen=True)
class ToySizes:
    train: int = 4000
    validation: int = 500
    test: int = 500
    nsfw_caps: int = 1000
    nsfw_caps_validation: int = 300  # the NSFW-Caps-like validation set (model selection)
    zeroshot_per_class: int = 40
    scene_per_class: int = 10
    distractors: int = 2000  # extra safe test images of a realistic retrieval gallery
    # borderline-safe records per split (each with its matched control: twice as many images)
    borderline_train: int = 500
    borderline_validation: int = 200
    borderline_test: int = 400


SMALL_SIZES = ToySizes(
    train=96,
    validation=24,
    test=24,
    nsfw_caps=40,
    nsfw_caps_validation=16,
    zeroshot_per_class=3,
    scene_per_class=1,
    distractors=24,
    borderline_train=12,
    borderline_validation=6,
    borderline_test=12,
)


def heldout_combinations() -> set[tuple[str, str]]:
    """(shape, unsafe concept) pairs kept out of train/validation: concept k with shape k mod 6."""
    return {(SHAPES[k % len(SHAPES)], obj) for k, obj in enumerate(UNSAFE)}


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def _coco_dir(split: str) -> str:
    return {"train": "train2017", "validation": "val2017", "test": "test2017"}[split]


def _write_visu_split(
    root: Path, split: str, n: int, rng: np.random.Generator, id_offset: int, pairing: Pairing
) -> list[dict]:
    """The split's pairs, made by ``pairing``. Training items each have their own safe image;
    in validation and test, items of one safe scene share one (one coco_id), so that "the
    right safe scene" of an unsafe caption is defined: its pair's safe image."""
    records = []
    held = heldout_combinations()
    for i in range(n):
        pair = make_pair(rng, pairing, held, want_heldout=(split == "test"), shared_safe_image=(split != "train"))
        if split == "train":
            coco_id = id_offset + i
            _save_png(render(pair.safe, rng), root / "visu" / _coco_dir(split) / f"{coco_id:012d}.png")
        else:
            coco_id = id_offset + safe_scene_key(pair.safe)
            path = root / "visu" / _coco_dir(split) / f"{coco_id:012d}.png"
            if not path.exists():
                _save_png(render(pair.safe, np.random.default_rng(coco_id)), path)
        nsfw_rel = f"nsfw/{split}/{i:06d}.png"
        _save_png(render(pair.unsafe, rng), root / "visu" / nsfw_rel)
        records.append(
            {
                "coco_id": coco_id,
                "nsfw_im_path": nsfw_rel,
                "safe": pair.safe_caption,
                "nsfw": pair.unsafe_caption,
                "tag": UNSAFE_OBJECTS[pair.unsafe.obj],
                "safe_scene": pair.safe.to_dict(),
                "nsfw_scene": pair.unsafe.to_dict(),
            }
        )
    return records


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _write_nsfw_caps(
    root: Path, n: int, rng: np.random.Generator, table: str = "nsfw_caps.csv", folder: str = ""
) -> None:
    """Minimal edits in phrasings never used for fine-tuning: only the object word changes.
    ``table`` under ``nsfw_caps/``; images under ``nsfw_caps/<folder>/images`` and
    ``.../nsfw_images`` (``nsfw_image_path`` relative to ``nsfw_caps/<folder>``)."""
    base = root / "nsfw_caps" / folder if folder else root / "nsfw_caps"
    rows = []
    for i in range(n):
        s = random_scene(rng, SAFE_OBJECTS)
        u = s.with_object(UNSAFE[rng.integers(len(UNSAFE))])
        # the same caption seed for both gives the same frame: a minimal edit
        cap_seed = int(rng.integers(2**31))
        safe_cap = caption(s, np.random.default_rng(cap_seed), SHIFT_FRAMES, SHIFT_OBJ)
        nsfw_cap = caption(u, np.random.default_rng(cap_seed), SHIFT_FRAMES, SHIFT_OBJ)
        name = f"{i:016x}.png"
        _save_png(render(s, rng), base / "images" / name)
        _save_png(render(u, rng), base / "nsfw_images" / name)
        rows.append(
            {
                "image_coco_url": f"https://toy.invalid/nocaps/{folder or 'val'}/{name}",
                "caption": safe_cap,
                "nsfw_caption": nsfw_cap,
                "chosen_category": UNSAFE_OBJECTS[u.obj],
                "nsfw_image_path": f"nsfw_images/{name}",
            }
        )
    _write_csv(root / "nsfw_caps" / table, rows)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_distractors(root: Path, n: int, rng: np.random.Generator) -> None:
    """Safe scenes of every kind, most with a safe object tile (like the training targets),
    some without: what a real index holds besides the test split's own safe images."""
    safe_objects: tuple[str | None, ...] = SAFE_OBJECTS + (None,)
    for i in range(n):
        _save_png(render(random_scene(rng, safe_objects), rng), root / "visu" / "distractors" / "test" / f"{i:06d}.png")


def _zeroshot_tasks() -> dict[str, tuple[list[str], str, tuple[str | None, ...]]]:
    """task -> (class names, attribute the class is, object tiles to draw from)."""
    safe_objs: tuple[str | None, ...] = SAFE_OBJECTS + (None,)
    shapes, colours = list(SHAPES), [f"{c} shape" for c in COLOURS]
    return {
        "shape": (shapes, "shape", safe_objs),
        "colour": (colours, "colour", safe_objs),
        "shape_unsafe": (shapes, "shape", UNSAFE),
        "colour_unsafe": (colours, "colour", UNSAFE),
        "scene": ([f"{c} {s}" for c in COLOURS for s in SHAPES], "scene", safe_objs),
    }


def _write_zeroshot(root: Path, sizes: ToySizes, rng: np.random.Generator) -> None:
    templates = [f.replace("{noun}", "{c}") for f in PROMPT_FRAMES]
    for task, (classnames, attr, objs) in _zeroshot_tasks().items():
        per_class = sizes.scene_per_class if task == "scene" else sizes.zeroshot_per_class
        base = root / "zeroshot" / task
        _write_json(base / "classnames.json", classnames)
        _write_json(base / "templates.json", templates)
        for name in classnames:
            for j in range(per_class):
                scene = random_scene(rng, objs)
                if attr == "shape":
                    scene = Scene(name, scene.colour, scene.size, scene.background, scene.obj, scene.quadrant)
                elif attr == "colour":
                    scene = Scene(scene.shape, name.split()[0], scene.size, scene.background, scene.obj, scene.quadrant)
                else:
                    colour, shape = name.split()
                    scene = Scene(shape, colour, scene.size, scene.background, scene.obj, scene.quadrant)
                _save_png(render(scene, rng), base / "test" / name.replace(" ", "_") / f"{j:04d}.png")


TOY_SIZES = {"default": ToySizes(), "small": SMALL_SIZES}


def check_toy_data(data_cfg: Mapping[str, Any]) -> tuple[ToySizes, Pairing]:
    """The sizes and pairing a toy data config names (``toy_size``, ``toy_pairs``), or a
    one-line ConfigError naming the key and the choices."""
    size = data_cfg.get("toy_size", "default")
    if size not in TOY_SIZES:
        raise ConfigError(f"data.toy_size must be one of {sorted(TOY_SIZES)}, got {size!r}")
    return TOY_SIZES[size], get_pairing(data_cfg.get("toy_pairs", DEFAULT_PAIRING))


def ensure_toy_world(data_cfg: Mapping[str, Any]) -> None:
    """Generate the toy world a data config names (``make_toy: true``, at ``root``, with
    ``toy_seed``, ``toy_size`` and ``toy_pairs``) unless it is already there; other data
    configs: nothing."""
    if not data_cfg.get("make_toy"):
        return
    sizes, pairing = check_toy_data(data_cfg)
    make_toy_world(data_cfg["root"], seed=int(data_cfg.get("toy_seed", 0)), sizes=sizes, pairing=pairing.name)


def make_toy_world(
    root: str | os.PathLike,
    seed: int = 0,
    sizes: ToySizes = ToySizes(),
    force: bool = False,
    pairing: str = DEFAULT_PAIRING,
) -> Path:
    """Generate the toy world under ``root`` with pairs made by the preset ``pairing``
    (:data:`saferclip.toyworld.pairing.PAIRINGS`) and return it.

    An existing world made with the same version, seed, pairing and sizes is reused as is.
    Anything else already at ``root`` is left alone unless ``force``: the world is written to a
    temporary folder and swapped in only when complete, so a crash leaves no half world.
    """
    root = Path(root)
    preset = get_pairing(pairing, "pairing")
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "pairing": preset.record(),
        "sizes": sizes.__dict__,
        "heldout_combinations": sorted(map(list, heldout_combinations())),
        "unsafe_concepts": UNSAFE_OBJECTS,
        "safe_objects": list(SAFE_OBJECTS),
    }
    existing = root / "manifest.json"
    older_toy_world = False
    if existing.is_file():
        try:
            found = json.loads(existing.read_text())
            if found == json.loads(json.dumps(manifest)):
                return root
            # an earlier generator version of the same world: ours, reproducible, replaced
            # (a newer version may have added parts: compare the sizes both versions know;
            # versions before 6 had one pairing, so any of them is replaced)
            older_toy_world = (
                isinstance(found, dict)
                and found.get("generator_version") != GENERATOR_VERSION
                and found.get("seed") == seed
                and isinstance(found.get("sizes"), dict)
                and all(manifest["sizes"].get(k) == v for k, v in found["sizes"].items())
            )
        except json.JSONDecodeError:
            pass
    if older_toy_world:
        log.warning(
            "%s holds toy world version %s; regenerating version %s",
            root,
            found.get("generator_version"),
            GENERATOR_VERSION,
        )
    elif root.exists() and any(root.iterdir()) and not force:
        raise FileExistsError(
            f"{root} exists and holds something other than this toy world (seed {seed}, pairing {preset.name}); "
            f"pass force=True (--force) to replace it"
        )
    with atomic_folder(root, replace=True) as tmp:  # what is there was checked above
        _generate(tmp, seed, sizes, preset)
        _write_json(tmp / "manifest.json", manifest)
    return root


def _generate(root: Path, seed: int, sizes: ToySizes, pairing: Pairing) -> None:
    # one child generator per part, so changing one part's size leaves the others' bytes alone;
    # children keep their index, so parts added later (7, 8: borderline; 9: the NSFW-Caps-like
    # validation set) change nothing before
    streams = np.random.SeedSequence(seed).spawn(9)
    rngs = [np.random.default_rng(s) for s in streams]
    offsets = {"train": 1, "validation": 1_000_000, "test": 2_000_000}
    for k, split in enumerate(("train", "validation", "test")):
        records = _write_visu_split(root, split, getattr(sizes, split), rngs[k], offsets[split], pairing)
        if split == "train":
            payload = {"info": {"description": "saferclip toy world, ViSU layout", "seed": seed}, "data": {}}
            payload["data"] = {str(i): r for i, r in enumerate(records)}
        else:
            payload = {str(i): r for i, r in enumerate(records)}
        _write_json(root / "visu" / f"{split}.json", payload)
        _write_csv(
            root / "visu_text" / f"{split}.csv",
            [
                {
                    "incremental_id": i,
                    "safe": r["safe"],
                    "nsfw": r["nsfw"],
                    "coco_id": r["coco_id"],
                    "tag": r["tag"],
                    "prompt_id": i,
                }
                for i, r in enumerate(records)
            ],
        )
    _write_nsfw_caps(root, sizes.nsfw_caps, rngs[3])
    _write_zeroshot(root, sizes, rngs[4])
    _write_distractors(root, sizes.distractors, rngs[5])
    _write_borderline(root, sizes, streams[6], rngs[7])
    _write_nsfw_caps(root, sizes.nsfw_caps_validation, rngs[8], table="validation.csv", folder="validation")


def _write_borderline(
    root: Path, sizes: ToySizes, split_stream: np.random.SeedSequence, zeroshot_rng: np.random.Generator
) -> None:
    from .borderline import write_borderline_split, write_borderline_zeroshot

    held = heldout_combinations()
    for split, child in zip(("train", "validation", "test"), split_stream.spawn(3)):
        n = getattr(sizes, f"borderline_{split}")
        write_borderline_split(root, split, n, np.random.default_rng(child), held, _save_png, _write_json)
    templates = [f.replace("{noun}", "{c}") for f in PROMPT_FRAMES]
    write_borderline_zeroshot(root, sizes.zeroshot_per_class, zeroshot_rng, templates, _save_png, _write_json)

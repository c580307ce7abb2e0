"""The toy world's borderline-safe content: safe, deterministic, in every split and in zero-shot
sets, matched controls, resemblance to the unsafe concept it imitates; generated from new RNG
streams, so the rest of the world keeps its bytes; and, on the shipped base model, the
nearest-word table and a lookalike the original model still names correctly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from saferclip.analysis.data import borderline_split, load_borderline
from saferclip.data import load_image_folder_task, load_visu_json
from saferclip.model.build import build_clip, default_base_checkpoint, encode_text
from saferclip.toyworld.borderline import (
    LOOKALIKE_BLEND,
    LOOKALIKE_OBJECTS,
    NEAREST_SAFE_WORD,
    lookalike_tile,
    tile_colours,
    tile_resemblance,
)
from saferclip.toyworld.generate import (
    SMALL_SIZES,
    heldout_combinations,
    make_toy_world,
)
from saferclip.toyworld.pretrain import to_model_input
from saferclip.toyworld.scene import (
    SAFE_OBJECTS,
    TILES,
    UNSAFE_OBJECTS,
    random_scene,
    render,
)

SPLITS = ("train", "validation", "test")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_borderline_split_files_in_every_split_and_zero_shot_set(toy_world: Path):
    held = heldout_combinations()
    for split in SPLITS:
        qset = load_visu_json(
            toy_world / "visu" / "borderline" / f"{split}.json",
            image_root=toy_world / "visu" / "borderline",
            split_dir=split,
            unsafe_image_root=toy_world / "visu" / "borderline",
            image_ext=".png",
        )
        n = getattr(SMALL_SIZES, f"borderline_{split}")
        assert len(qset) == 2 * n
        kinds = [q.meta["borderline"]["kind"] for q in qset]
        assert kinds == ["lookalike", "control"] * n
        seen = {"lookalike": set(), "control": set()}
        for look, ctrl in zip(qset.items[::2], qset.items[1::2]):
            info = look.meta["borderline"]
            twin = look.meta["nsfw_scene"]
            # safe content: the safe side holds a safe object, never an unsafe one
            assert look.meta["safe_scene"]["obj"] in SAFE_OBJECTS and ctrl.meta["safe_scene"]["obj"] in SAFE_OBJECTS
            assert info["safe_object"] == NEAREST_SAFE_WORD[twin["obj"]] and info["blend"] == LOOKALIKE_BLEND
            assert ctrl.meta["borderline"]["blend"] == 0.0 and ctrl.meta["safe_scene"]["obj"] != info["safe_object"]
            # borderline caption, control and unsafe twin: one sentence frame, one word apart
            for a, b in ((look.safe_caption, look.unsafe_caption), (ctrl.safe_caption, look.unsafe_caption)):
                wa, wb = a.split(), b.split()
                assert len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1
            assert look.unsafe_image == ctrl.unsafe_image and look.safe_image != ctrl.safe_image
            # the test split's twins are held-out combinations, as in ViSU's test split
            assert ((twin["shape"], twin["obj"]) in held) == (split == "test")
            for q in (look, ctrl):
                s = q.meta["safe_scene"]
                key = (s["shape"], s["colour"], s["size"], s["background"], s["obj"])
                assert key not in seen[q.meta["borderline"]["kind"]]  # one image per description
                seen[q.meta["borderline"]["kind"]].add(key)
    for task in ("shape_borderline", "colour_borderline", "object_borderline", "object"):
        t = load_image_folder_task(toy_world / "zeroshot" / task)
        assert {label for _, label in t.samples} == set(range(len(t.classnames)))
        assert len(t.samples) == SMALL_SIZES.zeroshot_per_class * len(t.classnames)
    assert load_image_folder_task(toy_world / "zeroshot" / "object").classnames == list(LOOKALIKE_OBJECTS)


def test_the_analysis_reads_the_borderline_split(toy_world: Path):
    root = toy_world / "visu" / "borderline"
    bl = load_borderline(
        {
            "path": root / "test.json",
            "image_root": root,
            "split_dir": "test",
            "unsafe_image_root": root,
            "image_ext": ".png",
        }
    )
    assert set(bl.quadruplets) == {"lookalike", "control"}
    assert len(bl.inputs["lookalike"]["image"]) == len(bl.inputs["control"]["image"]) == SMALL_SIZES.borderline_test
    assert len(bl.inputs["twin"]["image"]) == SMALL_SIZES.borderline_test
    assert load_borderline({"path": "None/visu/borderline/test.json"}) is None  # data without one
    # a user's own borderline set without kinds: all of it is borderline
    plain = dataclasses.replace(bl.quadruplets["lookalike"])
    plain.items = [dataclasses.replace(q, meta={}) for q in plain.items]
    assert set(borderline_split(plain).quadruplets) == {"lookalike"}


def test_lookalike_tiles_resemble_their_unsafe_concept():
    for unsafe, safe in NEAREST_SAFE_WORD.items():
        tile = lookalike_tile(safe, unsafe)
        assert tile.shape == TILES[safe].shape and tile.dtype == np.uint8
        assert np.array_equal(lookalike_tile(safe, unsafe, 0.0), TILES[safe])
        # the safe object's block code (its shape) is kept: the same pixels are foreground
        fg, fg_u = tile_colours(safe)[0], tile_colours(unsafe)[0]
        blended_fg = np.round((1 - LOOKALIKE_BLEND) * fg + LOOKALIKE_BLEND * fg_u).astype(np.uint8)
        assert np.array_equal((tile == blended_fg).all(-1), (TILES[safe] == fg.astype(np.uint8)).all(-1))
    for pair, r in tile_resemblance().items():
        assert r["lookalike_to_unsafe"] < r["ordinary_to_unsafe"], pair
    with pytest.raises(ValueError, match="needs a safe object and an unsafe concept, got 'gun', 'ball'"):
        lookalike_tile("gun", "ball")


def test_borderline_parts_leave_the_rest_of_the_world_byte_identical(toy_world: Path, tmp_path: Path):
    none = dataclasses.replace(SMALL_SIZES, borderline_train=0, borderline_validation=0, borderline_test=0)
    without = _files(make_toy_world(tmp_path / "without", seed=0, sizes=none))
    full = _files(toy_world)
    borderline = (
        "visu/borderline/",
        "zeroshot/shape_borderline/",
        "zeroshot/colour_borderline/",
        "zeroshot/object_borderline/",
        "zeroshot/object/",
    )
    rest = [k for k in full if not k.startswith(borderline) and k != "manifest.json"]
    assert rest and all(k in without and without[k] == full[k] for k in rest)


BASE = default_base_checkpoint()


def test_nearest_word_table_and_lookalikes_on_the_shipped_base_model():
    torch.set_num_threads(1)
    base = build_clip(None, BASE)
    objects = list(SAFE_OBJECTS) + list(UNSAFE_OBJECTS)
    text = encode_text(base, [f"a photo of a {o}." for o in objects])
    sims = text[: len(SAFE_OBJECTS)] @ text[len(SAFE_OBJECTS) :].T
    for j, unsafe in enumerate(UNSAFE_OBJECTS):
        assert SAFE_OBJECTS[int(sims[:, j].argmax())] == NEAREST_SAFE_WORD[unsafe], unsafe
    # the original model still names the safe object of a lookalike tile, for every pair
    rng = np.random.default_rng(0)
    for unsafe, safe in NEAREST_SAFE_WORD.items():
        scenes = [random_scene(rng, (safe,)) for _ in range(20)]
        images = np.stack([render(s, rng, tile=lookalike_tile(safe, unsafe)) for s in scenes])
        with torch.no_grad():
            pred = (base.model.encode_image(to_model_input(images), normalize=True) @ text.T).argmax(1)
        assert float((pred == objects.index(safe)).float().mean()) >= 0.8, (safe, unsafe)

"""The toy world generator: deterministic, rich enough, and with a real train/test shift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saferclip.data import load_image_folder_task, load_nsfw_caps, load_visu_json
from saferclip.toyworld.generate import (
    SMALL_SIZES,
    heldout_combinations,
    make_toy_world,
)
from saferclip.toyworld.scene import UNSAFE_OBJECTS


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(toy_world: Path, tmp_path: Path) -> None:
    reference = _files(toy_world)
    again = _files(make_toy_world(tmp_path / "again", seed=0, sizes=SMALL_SIZES))
    assert again.keys() == reference.keys()
    differing = [name for name in reference if reference[name] != again[name]]
    assert differing == []

    # validation/test safe images are one per scene (shared by items of that scene), so which
    # of them exist depends on the seed; compare the rest
    shared = ("visu/val2017/", "visu/test2017/")
    reference = {k: v for k, v in reference.items() if not k.startswith(shared)}
    other = _files(make_toy_world(tmp_path / "other", seed=1, sizes=SMALL_SIZES))
    other = {k: v for k, v in other.items() if not k.startswith(shared)}
    assert other.keys() == reference.keys()  # same layout and counts...
    changed = [name for name in reference if reference[name] != other[name]]
    # ...but other content: every split's data and most images differ
    for name in ("visu/train.json", "visu/test.json", "visu_text/train.csv", "nsfw_caps/nsfw_caps.csv"):
        assert name in changed
    assert len(changed) > 0.9 * len(reference)


def test_existing_world_is_reused_and_other_content_is_protected(toy_world: Path) -> None:
    before = (toy_world / "visu" / "train.json").stat().st_mtime_ns
    assert make_toy_world(toy_world, seed=0, sizes=SMALL_SIZES) == toy_world
    assert (toy_world / "visu" / "train.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="force"):
        make_toy_world(toy_world, seed=1, sizes=SMALL_SIZES)
    assert (toy_world / "visu" / "train.json").stat().st_mtime_ns == before


def test_enough_unsafe_concepts_and_zero_shot_tasks(toy_world: Path) -> None:
    manifest = json.loads((toy_world / "manifest.json").read_text())
    concepts = manifest["unsafe_concepts"]
    assert len(concepts) >= 10
    assert not set(concepts) & set(manifest["safe_objects"])

    seen = set()
    for split in ("train", "validation", "test"):
        for q in load_visu_json(toy_world / "visu" / f"{split}.json"):
            unsafe_obj, safe_obj = q.meta["nsfw_scene"]["obj"], q.meta["safe_scene"]["obj"]
            assert unsafe_obj in concepts and q.tag == concepts[unsafe_obj]
            assert safe_obj not in UNSAFE_OBJECTS  # the safe partner really is safe
            seen.add(unsafe_obj)
    assert len(seen) >= 5  # even the small world uses many concepts

    tasks = [load_image_folder_task(d) for d in sorted((toy_world / "zeroshot").iterdir())]
    big = [t for t in tasks if len(t.classnames) >= 5]
    assert len(big) >= 2
    for t in tasks:
        assert {label for _, label in t.samples} == set(range(len(t.classnames)))


def test_test_split_combinations_never_in_train(toy_world: Path) -> None:
    def combos(split: str) -> set[tuple[str, str]]:
        qset = load_visu_json(toy_world / "visu" / f"{split}.json")
        return {(q.meta["nsfw_scene"]["shape"], q.meta["nsfw_scene"]["obj"]) for q in qset}

    held = heldout_combinations()
    test = combos("test")
    assert test and test <= held
    assert not combos("train") & test
    assert not combos("validation") & held
    manifest = json.loads((toy_world / "manifest.json").read_text())
    assert {tuple(c) for c in manifest["heldout_combinations"]} == held


def test_nsfw_caps_are_minimal_edits(toy_world: Path) -> None:
    pairs = load_nsfw_caps(toy_world / "nsfw_caps" / "nsfw_caps.csv", image_root=toy_world / "nsfw_caps" / "images")
    assert len(pairs) == SMALL_SIZES.nsfw_caps
    for p in pairs:
        safe, unsafe = p.caption.split(), p.nsfw_caption.split()
        assert safe != unsafe
        assert len(safe) == len(unsafe) and sum(a != b for a, b in zip(safe, unsafe)) == 1
        assert p.nsfw_image is not None and p.nsfw_image.is_file()

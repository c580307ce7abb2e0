"""The toy world generator: deterministic, rich enough, and with a real train/test shift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saferclip.data import load_image_folder_task, load_nsfw_caps, load_visu_json
from saferclip.errors import ConfigError
from saferclip.locations import toy_world_dir
from saferclip.toyworld.generate import (
    GENERATOR_VERSION,
    SMALL_SIZES,
    heldout_combinations,
    make_toy_world,
)
from saferclip.toyworld.pairing import ATTRIBUTES, DEFAULT_PAIRING, PAIRINGS
from saferclip.toyworld.scene import UNSAFE_OBJECTS


def _files(root: Path) -> dict[str, bytes]:
    """The generator's files (pair_stats.json is a measurement the main job adds later, not
    the generator's output)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "pair_stats.json"
    }


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


@pytest.mark.parametrize(
    "table, images, n",
    [
        ("nsfw_caps.csv", "images", SMALL_SIZES.nsfw_caps),
        ("validation.csv", "validation/images", SMALL_SIZES.nsfw_caps_validation),
    ],
)
def test_nsfw_caps_are_minimal_edits(toy_world: Path, table: str, images: str, n: int) -> None:
    """The test set and the validation set (model selection) alike: minimal edits in new phrasings."""
    root = toy_world / "nsfw_caps"
    pairs = load_nsfw_caps(root / table, image_root=root / images, nsfw_image_root=root / Path(images).parent)
    assert len(pairs) == n
    for p in pairs:
        safe, unsafe = p.caption.split(), p.nsfw_caption.split()
        assert safe != unsafe
        assert len(safe) == len(unsafe) and sum(a != b for a, b in zip(safe, unsafe)) == 1
        assert p.nsfw_image is not None and p.nsfw_image.is_file()
    # validation and test show other scenes: no image is shared
    test = load_nsfw_caps(root / "nsfw_caps.csv", image_root=root / "images")
    valid = load_nsfw_caps(
        root / "validation.csv", image_root=root / "validation" / "images", nsfw_image_root=root / "validation"
    )
    assert not {p.image.read_bytes() for p in test} & {p.image.read_bytes() for p in valid}


def test_the_manifest_records_version_and_pairing(toy_world: Path) -> None:
    manifest = json.loads((toy_world / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION == 6
    assert manifest["pairing"] == PAIRINGS[DEFAULT_PAIRING].record() and manifest["pairing"]["name"] == "visu"
    assert manifest["sizes"]["nsfw_caps_validation"] == SMALL_SIZES.nsfw_caps_validation


def _words(caption: str) -> set[str]:
    return set(caption.split())


def test_every_split_is_paired_by_the_knob(tmp_path: Path) -> None:
    """minimal: the unsafe caption is the safe one with the object word replaced, the unsafe
    scene the safe one with the unsafe tile, in train, validation and test alike; loose: the
    pairing before version 6 (same shape and size, another colour and background)."""
    minimal = make_toy_world(tmp_path / "minimal", seed=3, sizes=SMALL_SIZES, pairing="minimal")
    loose = make_toy_world(tmp_path / "loose", seed=3, sizes=SMALL_SIZES, pairing="loose")
    for split in ("train", "validation", "test"):
        for q in load_visu_json(minimal / "visu" / f"{split}.json"):
            s, u = q.meta["safe_scene"], q.meta["nsfw_scene"]
            assert {k: v for k, v in s.items() if k != "obj"} == {k: v for k, v in u.items() if k != "obj"}
            safe, unsafe = q.safe_caption.split(), q.unsafe_caption.split()
            if s["obj"] is None:  # the unsafe object is written in: " with a gun" / " next to a gun"
                assert unsafe[: len(safe)] == safe and unsafe[-1] == u["obj"] and len(unsafe) - len(safe) in (3, 4)
            else:  # the object word replaced
                assert len(safe) == len(unsafe) and [(a, b) for a, b in zip(safe, unsafe) if a != b] == [
                    (s["obj"], u["obj"])
                ]
        for q in load_visu_json(loose / "visu" / f"{split}.json"):
            s, u = q.meta["safe_scene"], q.meta["nsfw_scene"]
            assert s["shape"] == u["shape"] and s["size"] == u["size"]
            assert s["colour"] != u["colour"] and s["background"] != u["background"]
    # one seed, every preset: the same safe side (scenes and captions); presets differ in the edit only
    safe_sides = [
        [(q.safe_caption, q.meta["safe_scene"]["obj"]) for q in load_visu_json(w / "visu" / "train.json")]
        for w in (minimal, loose)
    ]
    assert safe_sides[0] == safe_sides[1]


def test_the_default_pairing_keeps_most_words_and_renders_on_its_own(tmp_path: Path) -> None:
    """visu: the rewrite keeps each scene attribute with its preset probability (binomial
    bounds over the attributes of every pair) and the unsafe image has its own layout."""
    world = make_toy_world(tmp_path / "visu", seed=5, sizes=SMALL_SIZES, pairing="visu")
    items = [q for split in ("train", "validation", "test") for q in load_visu_json(world / "visu" / f"{split}.json")]
    preset = PAIRINGS["visu"]
    for attr in ("shape", "colour", "background"):  # size may be redrawn where the caption omits it
        kept = sum(q.meta["safe_scene"][attr] == q.meta["nsfw_scene"][attr] for q in items)
        p, n = preset.keep[attr], len(items)
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(kept - n * p) <= 4 * sd + 1, (attr, kept, n * p)
    same_layout = sum(q.meta["safe_scene"]["quadrant"] == q.meta["nsfw_scene"]["quadrant"] for q in items)
    assert abs(same_layout - len(items) / 4) <= 4 * (len(items) * 3 / 16) ** 0.5  # drawn anew: 1 in 4 by chance
    assert set(ATTRIBUTES) == set(preset.keep)


def test_each_pairing_has_its_own_folder_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    toy = tmp_path / "toy"
    assert toy_world_dir(toy, 0) == toy_world_dir(toy, 0, "visu") == toy
    assert toy_world_dir(toy, 2, "visu") == tmp_path / "toy-world2"
    assert toy_world_dir(toy, 0, "loose") == tmp_path / "toy-loose"
    assert toy_world_dir(toy, 1, "minimal") == tmp_path / "toy-minimal-world1"
    assert len({toy_world_dir(toy, s, p) for s in range(3) for p in PAIRINGS}) == 3 * len(PAIRINGS)
    with pytest.raises(
        ConfigError, match=r"data.toy_pairs must be one of \['minimal', 'visu', 'drifted', 'loose'\].*'nope'"
    ):
        toy_world_dir(toy, 0, "nope")
    # another pairing at the same folder is not silently replaced
    world = make_toy_world(tmp_path / "w", seed=0, sizes=SMALL_SIZES, pairing="minimal")
    with pytest.raises(FileExistsError, match="pairing loose"):
        make_toy_world(world, seed=0, sizes=SMALL_SIZES, pairing="loose")


def test_make_toy_refuses_a_bad_pairing_in_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from saferclip.app.commands import make_toy

    assert make_toy.main(["--out", str(tmp_path / "toy"), "--pairs", "nope", "--small"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "data.toy_pairs" in err and "['minimal', 'visu', 'drifted', 'loose']" in err and "'nope'" in err
    assert not any(tmp_path.iterdir())


def test_the_training_config_refuses_a_bad_pairing_before_any_work(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR, check_train_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"paths.toy_dir={tmp_path / 'toy'}", "data.toy_pairs=nope", "model=micro"])
    with pytest.raises(ConfigError, match=r"data.toy_pairs must be one of \['minimal', 'visu', 'drifted', 'loose'\]"):
        check_train_config(cfg)
    assert not any(tmp_path.iterdir())
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"paths.toy_dir={tmp_path / 'toy'}", "data.toy_pairs=loose", "data.toy_seed=2"])
    assert cfg.data.root == str(tmp_path / "toy-loose-world2")


@pytest.mark.slow
def test_pair_statistics_move_from_minimal_to_loose(tmp_path: Path) -> None:
    """With the shipped base model: the own pair gets farther (text and image cosine), the
    nearest safe item's lead over it grows and the own pair's rank falls, preset by preset."""
    from saferclip.model.build import build_clip, default_base_checkpoint
    from saferclip.toyworld.pair_stats import PAIR_STATS_FILE, pair_stats

    bundle = build_clip("saferclip-toy", str(default_base_checkpoint()))
    stats = {}
    for name in PAIRINGS:
        world = make_toy_world(tmp_path / name, seed=0, sizes=SMALL_SIZES, pairing=name)
        stats[name] = pair_stats(world, bundle)
        assert json.loads((world / PAIR_STATS_FILE).read_text()) == stats[name]
        assert stats[name]["pairing"] == name and stats[name]["pool"] == SMALL_SIZES.train
    order = list(PAIRINGS)
    assert order == ["minimal", "visu", "drifted", "loose"]
    for modality in ("text", "image"):
        own = [stats[n][modality]["own_cosine"]["median"] for n in order]
        gap = [stats[n][modality]["gap"]["median"] for n in order]
        rank = [stats[n][modality]["rank"]["median"] for n in order]
        assert own == sorted(own, reverse=True) and own[0] > own[-1] + 0.3, (modality, own)
        assert gap == sorted(gap) and rank == sorted(rank), (modality, gap, rank)


def test_pair_statistics_by_brute_force() -> None:
    """Ranks, top cosines and gaps against a hand-made 3-pair pool."""
    import torch

    from saferclip.toyworld.pair_stats import modality_stats

    def unit(*v):
        x = torch.tensor(v, dtype=torch.float32)
        return x / x.norm()

    safe = torch.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    unsafe = torch.stack([unit(1, 0.1), unit(1, 0.2), unit(0, 1)])
    s = modality_stats(unsafe, safe)
    # pair 0: own (1,0) is the nearest; pair 1: (1,1) and (1,0) are nearer than its own (0,1);
    # pair 2: its own (1,1) is beaten by (0,1)
    import math

    cos = lambda a, b: float((a * b).sum())  # noqa: E731
    own = [cos(unsafe[0], safe[0]), cos(unsafe[1], safe[1]), cos(unsafe[2], safe[2])]
    top = [cos(unsafe[0], safe[0]), max(cos(unsafe[1], safe[0]), cos(unsafe[1], safe[2])), 1.0]
    assert s["rank"]["median"] == 2 and s["rank"]["q1"] == 1.5 and s["rank"]["q3"] == 2.5  # ranks 1, 3, 2
    assert s["own_is_top"] == pytest.approx(1 / 3)
    assert s["own_cosine"]["median"] == pytest.approx(sorted(own)[1])
    assert s["gap"]["mean"] == pytest.approx(sum(t - o for t, o in zip(top, own)) / 3)
    assert not math.isnan(s["top_cosine"]["median"])


def test_the_docs_show_the_committed_pair_statistics_of_the_current_presets() -> None:
    """docs/METHOD.md's preset and pair-statistics tables are generated from
    docs/results/pair_stats.json, which was measured with today's presets and generator."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    results = json.loads((repo / "docs" / "results" / "pair_stats.json").read_text())
    assert results["pairings"] == {name: p.record() for name, p in PAIRINGS.items()}
    assert {s["generator_version"] for s in results["presets"].values()} == {GENERATOR_VERSION}
    assert list(results["presets"]) == list(PAIRINGS)
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "pair_stats_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr

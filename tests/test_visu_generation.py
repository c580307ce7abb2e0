"""saferclip-generate-visu: unsafe images for ViSU(-Text) captions, end to end with a tiny
diffusion pipeline on the CPU: the first flagged seed is kept, unflagged captions are counted,
a killed run resumes without redoing finished captions, shards cover the split exactly once
with the same images as one process, and the merged ViSU JSON loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from diffusion_helpers import (
    export_micro,
    save_tiny_pipeline,
    single_thread,
)
from PIL import Image
from train_helpers import time_budget
from visu_scorers import hash_scores

from saferclip.app.commands.generate_visu import main as generate_main
from saferclip.data import DataFormatError, load_quadruplets, load_visu_json
from saferclip.data.records import QuadrupletSet
from saferclip.downstream.generation_records import RECORDS_DIR, image_stem, read_records
from saferclip.downstream.generation_settings import GenerationConfig
from saferclip.downstream.image_generator import DiffusersImageGenerator, load_diffusion_pipeline
from saferclip.downstream.nsfw_scorer import ClipNsfwScorer
from saferclip.downstream.visu_generation import generate_visu_images, merge_generation, parse_shard

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

TESTS = Path(__file__).resolve().parent
CONFIG = GenerationConfig(steps=2, height=16, width=16)  # the published seeds 1234, 1999, 8185
N_CAPTIONS = 7


@pytest.fixture(scope="module")
def world(toy_world: Path, tmp_path_factory) -> SimpleNamespace:
    """A handful of ViSU-Text rows (the toy world's test table), a tiny saved pipeline, and one
    uninterrupted single-process run to compare everything else with."""
    root = tmp_path_factory.mktemp("generate")
    lines = (toy_world / "visu_text" / "test.csv").read_text().splitlines()
    captions = root / "visu_text_test.csv"
    captions.write_text("\n".join(lines[: N_CAPTIONS + 1]) + "\n")
    pipeline = save_tiny_pipeline(root / "pipeline", export_micro(root / "text-encoder"))
    w = SimpleNamespace(captions=captions, pipeline=pipeline, toy=toy_world, root=root)
    w.single = root / "single"
    with single_thread():
        w.single_report = generate_visu_images(captions, w.single, factory(w), hash_scores, CONFIG)
    return w


def factory(world: SimpleNamespace, calls: list | None = None, stop_after: int | None = None):
    """A generator factory over the saved tiny pipeline; ``calls`` records each (prompt, seed);
    ``stop_after`` interrupts the run (as Ctrl-C would) at that call."""

    def make():
        generate = DiffusersImageGenerator(load_diffusion_pipeline(str(world.pipeline)), CONFIG)

        def call(prompt: str, seed: int) -> Image.Image:
            if calls is not None:
                calls.append((prompt, seed))
                if stop_after is not None and len(calls) >= stop_after:
                    raise KeyboardInterrupt
            return generate(prompt, seed)

        return call

    return make


def comparable(out: Path) -> tuple[dict, dict]:
    """Records without timing / shard, and the kept images' pixels: what must not depend on how
    the work was split or interrupted."""
    records, _ = read_records(out)
    recs = {k: {f: v for f, v in r.items() if f not in ("seconds", "shard")} for k, r in records.items()}
    images = {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}
    return recs, images


def assert_same_run(a: Path, b: Path) -> None:
    ra, ia = comparable(a)
    rb, ib = comparable(b)
    assert ra == rb
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)


# ---------------------------------------------------------------- one run, end to end


def test_generation_keeps_the_first_flagged_seed_and_the_json_loads(world, tmp_path):
    """A planned scorer takes every branch on purpose: flagged at the first, the second and the
    last seed, exactly at the threshold, and never (all seeds below it, one just below)."""
    seeds, t = list(CONFIG.seeds), CONFIG.threshold
    assert len(seeds) == 3 and 0.25 < t < 0.75
    low, high = t - 0.25, t + 0.25
    plan = [  # each caption's scores, one per seed tried, in order
        [high],  # flagged at the first seed: the other seeds are never tried
        [low, high],  # at the second
        [low, low, high],  # at the last
        [low, low, low],  # unflagged
        [t],  # exactly at the threshold: flagged
        [low, t - 1e-6, low],  # just below it: unflagged
        [low, 1.0],
    ]
    assert len(plan) == N_CAPTIONS
    queue = [score for scores in plan for score in scores]
    scored: list[np.ndarray] = []

    def planned(images: list[Image.Image]) -> list[float]:
        scored.extend(np.asarray(im.convert("RGB")) for im in images)
        return [queue.pop(0) for _ in images]

    out = tmp_path / "planned"
    report = generate_visu_images(world.captions, out, factory(world), planned, CONFIG)
    assert queue == []  # every planned score asked for, in order: no seed after a flag, none skipped
    flags = [next((j for j, score in enumerate(scores) if score >= t), None) for scores in plan]
    assert flags == [0, 1, 2, None, 0, None, 1]
    assert (report.flagged, report.unflagged, report.remaining, report.already_done) == (5, 2, 0, 0)
    records, ignored = read_records(out)
    assert len(records) == N_CAPTIONS and ignored == 0
    split = load_quadruplets(world.captions, mode="text")
    position = 0  # of the caption's first image among everything scored
    for q, scores, flag in zip(split, plan, flags):
        rec = records[q.id]
        assert rec["scores"] == {str(seed): score for seed, score in zip(seeds, scores)}
        if flag is None:
            assert rec["status"] == "unflagged"
            assert "image" not in rec and not (out / "images" / f"{image_stem(q.id)}.png").exists()
        else:
            assert rec["status"] == "flagged" and rec["seed"] == seeds[flag] and rec["score"] == scores[flag]
            assert rec["generator_seed"] == CONFIG.generator_seed(q.id, seeds[flag]) == seeds[flag]
            # the PNG holds exactly the image that was scored for the flagged seed
            assert np.array_equal(np.asarray(Image.open(out / rec["image"]).convert("RGB")), scored[position + flag])
        position += len(scores)

    # the merged ViSU JSON: our loaders read it in full mode, safe images from the toy world
    merged = report.merged
    assert merged == out / "visu_text_test.json"
    loaded = load_visu_json(
        merged,
        image_root=world.toy / "visu",
        split_dir="test2017",
        image_ext=".png",
        unsafe_image_root=out,
        mode="full",
    )
    flagged = [q for q, flag in zip(split, flags) if flag is not None]
    assert [q.id for q in loaded] == [q.id for q in flagged]
    for q, src in zip(loaded, flagged):
        assert (q.unsafe_caption, q.safe_caption, q.tag) == (src.unsafe_caption, src.safe_caption, src.tag)
        assert q.unsafe_image == out / records[q.id]["image"] and q.unsafe_image.is_file() and q.safe_image.is_file()
        assert q.meta["nsfw_im_seed"] == records[q.id]["seed"] and q.meta["prompt_id"] == src.meta["prompt_id"]
    info = json.loads(merged.read_text())["info"]
    unflagged = [q.id for q, flag in zip(split, flags) if flag is None]
    assert info["unflagged"] == unflagged and info["counts"] == {
        "captions": N_CAPTIONS,
        "flagged": len(flagged),
        "unflagged": len(unflagged),
        "missing": 0,
    }
    assert info["source"] == "visu_text_test.csv" and info["generation"]["config"]["seeds"] == list(CONFIG.seeds)


def test_images_are_deterministic_per_caption(world, tmp_path):
    """The same (caption, seed) gives the same image whatever ran before it."""
    records, _ = read_records(world.single)
    split = load_quadruplets(world.captions, mode="text")
    generate = factory(world)()
    flagged = [q for q in reversed(split.items) if records[q.id]["status"] == "flagged"]  # another order than the run's
    assert flagged, "the reference run kept no image to compare with"
    for q in flagged:
        rec = records[q.id]
        again = generate(q.unsafe_caption, rec["generator_seed"])
        assert np.array_equal(np.asarray(again), np.asarray(Image.open(world.single / rec["image"])))


# ---------------------------------------------------------------- the selection logic, exactly


def coded_generator(calls: list):
    """Images that encode which caption and seed made them (no diffusion): R = caption index, G = seed % 256."""

    def generate(prompt: str, seed: int) -> Image.Image:
        calls.append((prompt, seed))
        return Image.new("RGB", (4, 4), (int(prompt.split("#")[1]), seed % 256, 0))

    return generate


def rule_scorer(images):
    """Flags seed 1999's image of even captions; odd captions never."""
    out = []
    for im in images:
        r, g, _ = im.getpixel((0, 0))
        out.append(0.9 if (r % 2 == 0 and g == 1999 % 256) else 0.1)
    return out


def numbered_split(n: int, source: Path) -> QuadrupletSet:
    from saferclip.data import Mode, Quadruplet

    items = [Quadruplet(str(10 + k), f"safe #{k}", f"unsafe #{k}", tag="t", meta={"coco_id": k}) for k in range(n)]
    return QuadrupletSet(items, Mode.TEXT, str(source))


def test_first_flagged_seed_is_kept_and_unflagged_captions_are_recorded(tmp_path):
    calls: list = []
    split = numbered_split(6, tmp_path / "split.json")
    report = generate_visu_images(split, tmp_path / "out", lambda: coded_generator(calls), rule_scorer, CONFIG)
    assert (report.flagged, report.unflagged) == (3, 3)
    # even captions: 1234 tried and rejected, 1999 kept, 8185 never tried; odd: all three tried
    expected = []
    for k in range(6):
        expected += [(f"unsafe #{k}", 1234), (f"unsafe #{k}", 1999)] + ([(f"unsafe #{k}", 8185)] if k % 2 else [])
    assert calls == expected
    records, _ = read_records(tmp_path / "out")
    assert {k: r["seed"] for k, r in records.items() if r["status"] == "flagged"} == {
        "10": 1999,
        "12": 1999,
        "14": 1999,
    }
    assert sorted(k for k, r in records.items() if r["status"] == "unflagged") == ["11", "13", "15"]
    info = json.loads(report.merged.read_text())["info"]
    assert info["unflagged"] == ["11", "13", "15"] and info["counts"]["unflagged"] == 3
    assert "3 with no flagged image" in report.summary()


def test_seed_per_caption_depends_on_the_caption_not_the_order(tmp_path):
    config = GenerationConfig(seeds=(1, 2), steps=2, height=16, width=16, seed_per_caption=True)
    split = numbered_split(4, tmp_path / "split.json")
    runs = []
    for name, items in (("a", split.items), ("b", list(reversed(split.items)))):
        calls: list = []
        generate_visu_images(
            QuadrupletSet(items, split.mode, split.source),
            tmp_path / name,
            lambda: coded_generator(calls),
            lambda ims: [0.0] * len(ims),
            config,
        )
        runs.append(sorted(calls))
    assert runs[0] == runs[1]
    seeds = [s for _, s in runs[0]]
    assert len(set(seeds)) == len(seeds)  # a different noise for every (caption, seed)
    assert config.generator_seed("10", 1) == GenerationConfig(seeds=(1, 2), seed_per_caption=True).generator_seed(
        "10", 1
    )


# ---------------------------------------------------------------- resume, shards


def test_an_interrupted_run_resumes_without_redoing_finished_captions(world, tmp_path):
    out = tmp_path / "out"
    calls: list = []
    with pytest.raises(KeyboardInterrupt, match="^$"):  # Ctrl-C, as the factory's stand-in raises it
        generate_visu_images(world.captions, out, factory(world, calls, stop_after=5), hash_scores, CONFIG)
    finished, _ = read_records(out)
    assert 0 < len(finished) < N_CAPTIONS
    # a kill in the middle of writing a record leaves a line cut short: ignored, counted, redone
    records_file = next((out / RECORDS_DIR).glob("*.jsonl"))
    split = load_quadruplets(world.captions, mode="text")
    victim = next(q for q in split if q.id not in finished)
    with open(records_file, "a") as f:
        f.write(json.dumps({"id": victim.id, "status": "flagged", "scores": {}})[:25])
    calls = []
    report = generate_visu_images(world.captions, out, factory(world, calls), hash_scores, CONFIG)
    assert report.already_done == len(finished) and report.ignored_lines == 1
    assert report.flagged + report.unflagged == N_CAPTIONS - len(finished)
    redone = {prompt for prompt, _ in calls}
    assert not redone & {q.unsafe_caption for q in split if q.id in finished}  # nothing finished was redone
    assert victim.unsafe_caption in redone
    assert_same_run(out, world.single)  # and the result is the uninterrupted run's
    assert all(json.loads(line) for line in records_file.read_text().splitlines())  # the damaged line is gone
    # a third run has nothing left to do: it loads no pipeline
    report = generate_visu_images(world.captions, out, lambda: pytest.fail("loaded a pipeline"), hash_scores, CONFIG)
    assert report.already_done == N_CAPTIONS and report.merged is not None and report.ignored_lines == 0


def test_shards_cover_the_split_exactly_once(world, tmp_path):
    out = tmp_path / "out"
    split = load_quadruplets(world.captions, mode="text")
    for n_done, i in enumerate((2, 0, 1), start=1):  # any order, as parallel processes finish
        report = generate_visu_images(world.captions, out, factory(world), hash_scores, CONFIG, shard=f"{i}/3")
        assert report.shard_items == len(split.items[i::3])
        assert (report.merged is not None) == (n_done == 3)  # the last shard to finish merges
    ids_by_file = {
        p.name: [json.loads(line)["id"] for line in p.read_text().splitlines()]
        for p in (out / RECORDS_DIR).glob("*.jsonl")
    }
    for i in range(3):
        assert ids_by_file[f"shard-{i}-of-3.jsonl"] == [q.id for q in split.items[i::3]]
    all_ids = [k for ids in ids_by_file.values() for k in ids]
    assert sorted(all_ids) == sorted(q.id for q in split) and len(set(all_ids)) == len(all_ids)
    assert_same_run(out, world.single)  # per-caption determinism: the same images as one process
    assert json.loads((out / "visu_text_test.json").read_text()) == json.loads(
        (world.single / "visu_text_test.json").read_text()
    )


def test_settings_are_fixed_by_the_first_run(world, tmp_path):
    out = tmp_path / "out"
    generate_visu_images(world.captions, out, factory(world), hash_scores, CONFIG, limit=1)
    other = GenerationConfig(seeds=(1, 2), steps=2, height=16, width=16)
    with pytest.raises(
        DataFormatError, match=r"generation.json: this folder was generated with other settings \(config.seeds"
    ):
        generate_visu_images(world.captions, out, factory(world), hash_scores, other)
    with pytest.raises(ValueError, match="6 of 7 captions have no record yet"):
        merge_generation(world.captions, out)
    partial = merge_generation(world.captions, out, allow_partial=True)
    assert json.loads(partial.read_text())["info"]["counts"]["missing"] == N_CAPTIONS - 1
    with pytest.raises(ValueError, match="scorer returned 2 scores for 1 image"):
        generate_visu_images(world.captions, tmp_path / "o2", factory(world), lambda ims: [0.1, 0.2], CONFIG)


def test_shard_specs_and_file_names(monkeypatch):
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1) and parse_shard((0, 2)) == (0, 2)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard("auto") == (3, 8)
    assert image_stem("123") == "123" and image_stem("a/b").startswith("id-") and image_stem("..").startswith("id-")
    with pytest.raises(ValueError, match="seeds"):
        GenerationConfig(seeds=(1, 1))


# ---------------------------------------------------------------- the CLIP scorer on the toy world


def test_clip_nsfw_scorer_separates_the_toy_worlds_unsafe_images(toy_world):
    """The toy base CLIP as a zero-shot NSFW classifier: every unsafe toy test image scores above
    every safe one (measured: unsafe ~1.0, safe ~1e-11)."""
    from saferclip.model.build import build_clip, default_base_checkpoint
    from saferclip.toyworld.scene import SAFE_OBJECTS, UNSAFE_OBJECTS

    scorer = ClipNsfwScorer(
        build_clip("saferclip-toy", default_base_checkpoint()),
        [f"a shape next to a {o}" for o in UNSAFE_OBJECTS],
        [f"a shape next to a {o}" for o in SAFE_OBJECTS] + ["a shape on a background"],
    )
    unsafe = np.array(scorer([Image.open(p) for p in sorted((toy_world / "visu" / "nsfw" / "test").glob("*.png"))]))
    safe = np.array(scorer([Image.open(p) for p in sorted((toy_world / "visu" / "test2017").glob("*.png"))]))
    assert len(unsafe) >= 20 and len(safe) >= 20
    assert ((0 <= unsafe) & (unsafe <= 1)).all() and ((0 <= safe) & (safe <= 1)).all()
    assert unsafe.min() > safe.max()  # AUC 1
    assert (unsafe >= 0.5).all() and (safe < 0.5).all()
    assert scorer.describe()["weights"] == "toy_base.safetensors"


# ---------------------------------------------------------------- the CLI

CLI_FAST = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--no-progress"]


def test_cli_generates_resumes_and_refuses_in_one_line(world, tmp_path, capsys):
    out = tmp_path / "out"
    base = [str(world.captions), str(out), "--pipeline", str(world.pipeline), *CLI_FAST]
    clip = ["--scorer", "clip", "--scorer-arch", "saferclip-micro", "--scorer-pretrained", "none"]
    assert generate_main([*base, *clip, "--limit", "2"]) == 0
    assert "2 done now" in capsys.readouterr().out
    assert generate_main([*base, *clip]) == 0
    printed = capsys.readouterr().out
    assert f"2 were done before, {N_CAPTIONS - 2} done now" in printed and "wrote" in printed
    settings = json.loads((out / "generation.json").read_text())
    assert settings["pipeline"] == "pipeline" and settings["scorer"]["arch"] == "saferclip-micro"  # names, not paths
    assert str(tmp_path) not in (out / "generation.json").read_text()
    loaded = load_visu_json(
        out / "visu_text_test.json",
        image_root=world.toy / "visu",
        split_dir="test2017",
        image_ext=".png",
        unsafe_image_root=out,
    )
    assert len(loaded) == json.loads((out / "visu_text_test.json").read_text())["info"]["counts"]["flagged"]
    assert generate_main([str(world.captions), str(out), "--merge-only"]) == 0

    for argv, message in [
        ([*base, *clip, "--seeds", "1", "2"], "this folder was generated with other settings"),
        ([*base, *clip, "--shard", "3/3"], "shard 3/3: expected 0 <= i < n"),
        ([str(tmp_path / "none.csv"), str(out), *CLI_FAST], "file not found"),
        ([*base, "--scorer", "no_such_module:make"], "cannot import it"),
        (
            [str(world.captions), str(tmp_path / "o2"), "--pipeline", str(tmp_path), *CLI_FAST, *clip],
            "not a diffusers pipeline folder",
        ),
        ([*base, *clip, "--limit", "-1"], "--limit -1: expected a number of captions >= 1"),
        ([*base, *clip, "--limit", "0"], "--limit 0: expected"),
        ([*base, *clip, "--height", "100"], "--height 100: expected a multiple of 8"),
        ([*base, *clip, "--width", "0"], "--width 0: expected a multiple of 8"),
        ([*base, *clip, "--guidance", "nan"], "--guidance nan: expected a finite guidance scale"),
        ([*base, *clip, "--guidance", "-1"], "--guidance -1.0: expected"),
        ([*base, *clip, "--threshold", "nan"], "--threshold nan: expected an NSFW score in [0, 1]"),
        ([*base, *clip, "--steps", "0"], "--steps 0: expected"),
        ([*base, *clip, "--seeds", "1", "1"], "--seeds 1 1: expected distinct integers >= 0"),
        ([*base, *clip, "--seeds", "-3"], "--seeds -3: expected distinct integers >= 0"),
        ([*base[:2], "--pipeline", str(tmp_path / "no" / "pipeline"), *CLI_FAST, *clip], "no such folder"),
        (
            [*base[:2], "--pipeline", "./missing-pipeline", *CLI_FAST, *clip],
            "--pipeline ./missing-pipeline: no such folder",
        ),
        (
            [*base[:2], "--pipeline", str(world.captions), *CLI_FAST, *clip],
            "a file, expected a diffusers pipeline folder",
        ),
    ]:
        capsys.readouterr()
        assert generate_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("saferclip-generate-visu: error:") and message in err and "\n" not in err, err


@pytest.mark.slow
def test_cli_killed_mid_run_resumes(world, tmp_path):
    """A real SIGKILL of the command, then the same command again: it finishes the rest, and
    the result is the uninterrupted run's."""
    out = tmp_path / "out"
    argv = [
        str(world.captions),
        str(out),
        "--pipeline",
        str(world.pipeline),
        *CLI_FAST,
        "--scorer",
        "visu_scorers:make_slow_hash_scorer",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    left = time_budget()  # the killed run and the resumed one share the test's time
    proc = subprocess.Popen(
        [sys.executable, "-m", "saferclip.app.commands.generate_visu", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    records_dir = out / RECORDS_DIR
    deadline = time.time() + min(240, left())
    try:
        while time.time() < deadline and proc.poll() is None:
            done = (
                sum(len(p.read_text().splitlines()) for p in records_dir.glob("*.jsonl")) if records_dir.is_dir() else 0
            )
            if done >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished, _ = read_records(out)
    assert 2 <= len(finished) < N_CAPTIONS and not (out / "visu_text_test.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "saferclip.app.commands.generate_visu", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=left(),
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(finished)} were done before" in resumed.stdout
    assert_same_run(out, world.single)

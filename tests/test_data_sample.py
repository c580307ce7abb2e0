"""The committed data sample (`data/sample/`, data/README.md): every real format loads with
its images, the docs' dry-run commands on it pass as written, and git tracks the sample while
ignoring what saferclip generates under `data/`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.data import (
    Mode,
    load_image_folder_task,
    load_nsfw_caps,
    load_quadruplets,
    load_visu_json,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SIZES = {"train": 6, "validation": 3, "test": 3}
COCO_DIR = {"train": "train2017", "validation": "val2017", "test": "val2017"}  # conf/data/visu.yaml


def readable(path: Path | None) -> bool:
    assert path is not None and path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    return True


@pytest.mark.parametrize("split", SIZES)
def test_visu_json_sample_loads_in_full_mode(split):
    qset = load_visu_json(
        SAMPLE / "visu" / f"{split}.json",
        image_root=SAMPLE / "coco",
        split_dir=COCO_DIR[split],
        unsafe_image_root=SAMPLE / "visu",
        verify_images=True,
    )
    assert qset.mode is Mode.FULL and len(qset) == SIZES[split]
    for q in qset:
        assert q.safe_caption and q.unsafe_caption and q.tag
        assert readable(q.safe_image) and readable(q.unsafe_image)
        assert q.safe_image.name == f"{q.meta['coco_id']:012d}.jpg"


@pytest.mark.parametrize("split", SIZES)
def test_visu_text_sample_holds_the_same_records(split):
    text = load_quadruplets(SAMPLE / "visu_text" / f"{split}.csv")
    assert text.mode is Mode.TEXT
    json_set = load_visu_json(SAMPLE / "visu" / f"{split}.json")
    assert [(q.safe_caption, q.unsafe_caption, q.tag) for q in text] == [
        (q.safe_caption, q.unsafe_caption, q.tag) for q in json_set
    ]
    with_images = load_quadruplets(
        SAMPLE / "visu_text" / f"{split}.csv", image_root=SAMPLE / "coco", split_dir=COCO_DIR[split]
    )
    assert with_images.mode is Mode.SAFE_IMAGES and all(readable(q.safe_image) for q in with_images)


def test_nsfw_caps_sample_loads_with_its_images():
    pairs = load_nsfw_caps(SAMPLE / "nsfw_caps" / "nsfw_caps.csv", image_root=SAMPLE / "nocaps", verify_images=True)
    assert len(pairs) == 4 and pairs.has_images and not pairs.has_nsfw_images
    assert all(readable(p.image) and p.caption != p.nsfw_caption for p in pairs)


def test_zeroshot_sample_loads():
    task = load_image_folder_task(SAMPLE / "zeroshot" / "shape")
    assert task.classnames == ["circle", "square"]
    assert len(task.samples) == 4 and sorted(label for _, label in task.samples) == [0, 0, 1, 1]
    assert all("{c}" in t for t in task.templates)


def test_sample_is_tiny():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert 0 < sum(p.stat().st_size for p in files) < 100_000, "data/sample/ is meant to stay a few dozen kB"


def documented_dry_runs() -> list[tuple[str, list[str]]]:
    """Every `saferclip-train ... dry_run=true` line on the sample in the README, docs/USAGE.md and data/README.md."""
    out = []
    for doc in (REPO / "README.md", REPO / "docs" / "USAGE.md", REPO / "data" / "README.md"):
        for line in doc.read_text().splitlines():
            if re.match(r"\s*saferclip-train .*dry_run=true", line) and "data/sample/" in line:
                args = shlex.split(line.split("#")[0])[1:]
                out.append((f"{doc.relative_to(REPO)}: {' '.join(args)}", args))
    return out


DRY_RUNS = documented_dry_runs()


def test_the_docs_show_dry_runs_on_the_sample():
    docs = {name.split(":")[0] for name, _ in DRY_RUNS}
    assert docs == {"docs/USAGE.md", "data/README.md"}, docs


@pytest.mark.parametrize("args", [a for _, a in DRY_RUNS], ids=[n for n, _ in DRY_RUNS])
def test_documented_dry_run_passes(args, monkeypatch, tmp_path):
    from saferclip.app.engine.fit import dry_run
    from saferclip.app.hydra_utils import to_container
    from saferclip.training.method import method_config

    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository root
    monkeypatch.setenv("SAFERCLIP_HOME", str(tmp_path))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=args)
    report = dry_run(cfg, method_config(to_container(cfg.method)))
    expected_mode = "full" if "paths.visu_images=data/sample/visu" in args else "safe_images"
    assert {split: (r["items"], r["mode"]) for split, r in report.items()} == {
        split: (n, expected_mode) for split, n in SIZES.items()
    }
    assert not list(tmp_path.rglob("*")), "a dry run writes nothing"


def git_ignored(paths: list[str]) -> set[str]:
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    return set(proc.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_git_tracks_the_sample_and_ignores_generated_data():
    sample = [str(p.relative_to(REPO)) for p in SAMPLE.rglob("*") if p.is_file()]
    assert not git_ignored(["data/README.md", *sample])
    generated = ["data/toy/manifest.json", "data/toy/visu/train.json", "data/toy_base.safetensors", "data/cache/x.npy"]
    assert git_ignored(generated) == set(generated)

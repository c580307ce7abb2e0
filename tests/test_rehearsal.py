"""The rehearsal world (toy scenes at 224 px as JPEG in ViSU's real layout, read by the real
`visu` data config) and saferclip-rehearse's stages end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from saferclip.app.commands.rehearse import main
from saferclip.app.pipelines.rehearse import rehearse
from saferclip.data.splits import load_split
from saferclip.toyworld.rehearsal import make_rehearsal_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rehearsal_world_is_visu_at_real_size(tmp_path):
    root = make_rehearsal_world(tmp_path / "world", train=10, validation=6, test=4, size=224)
    data = {
        "name": "visu",
        "mode": "auto",
        "on_error": "raise",
        "splits": {
            split: {
                "path": str(root / "visu" / f"{split}.json"),
                "image_root": str(root / "coco"),
                "split_dir": "train2017" if split == "train" else "val2017",
                "unsafe_image_root": str(root / "visu_images"),
                "image_ext": ".jpg",
            }
            for split in ("train", "validation", "test")
        },
    }
    train = load_split(data, "train")
    assert len(train) == 10 and train.mode.value == "full"
    assert len(load_split(data, "validation")) == 6 and len(load_split(data, "test")) == 4
    for q in train.items[:3]:
        assert q.safe_image.parent.name == "train2017" and len(q.safe_image.stem) == 12
        for path in (q.safe_image, q.unsafe_image):
            with Image.open(path) as im:
                assert (im.format, im.size) == ("JPEG", (224, 224))
    payload = json.loads((root / "visu" / "train.json").read_text())
    assert set(payload) == {"info", "data"} and {"coco_id", "nsfw_im_path", "safe", "nsfw", "tag"} <= set(
        payload["data"]["0"]
    )
    stamp = (root / "manifest.json").stat().st_mtime_ns
    make_rehearsal_world(root, train=10, validation=6, test=4, size=224)  # reused as it is
    assert (root / "manifest.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_rehearse_runs_every_stage_and_exports_both_formats(tmp_path):
    rows = rehearse(tmp_path, ["model=micro"], items=12, steps=2, device="cpu", batch_size=4)
    assert [r["stage"] for r in rows] == ["world", "cache", "neighbours", "train", "evaluation", "export"]
    assert all(r["items"] > 0 and r["items_per_s"] > 0 and r["peak_gb"] > 0 for r in rows)
    assert rows[3]["items"] == 8  # steps x batch size
    assert (tmp_path / "export_open_clip" / "open_clip_config.json").is_file()
    assert (tmp_path / "export_hf" / "config.json").is_file()
    # the command: the same, plus the table as JSON
    assert (
        main(
            [
                "model=micro",
                "--items",
                "12",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "cli"),
                "--json",
                str(tmp_path / "table.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["device"] == "cpu" and len(table["stages"]) == 6
    assert main(["model=nope", "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2

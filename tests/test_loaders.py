"""The data loaders read every toy-world format, and refuse (or, asked to, skip and report)
malformed input with an error that names the file, the row and the field."""

from __future__ import annotations

import csv
import json
import pickle
import re
import sys
import tarfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saferclip.data import (
    CaptionPairImages,
    DataFormatError,
    Mode,
    QuadrupletImages,
    ZeroShotImages,
    load_image_folder_task,
    load_nsfw_caps,
    load_quadruplets,
    load_torchvision_task,
    load_visu_json,
    load_visu_table,
    load_webdataset_task,
)


def to_tensor(image) -> torch.Tensor:
    """A stand-in for open_clip's preprocess: PIL -> [3, H, W] float."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0


def visu_kw(world: Path, split_dir: str = "train2017") -> dict[str, Any]:
    return dict(image_root=world / "visu", unsafe_image_root=world / "visu", split_dir=split_dir, image_ext=".png")


def assert_names(err: pytest.ExceptionInfo, file: Path, row: Any, field: str | None, words: str) -> None:
    e, msg = err.value, str(err.value)
    assert isinstance(e, DataFormatError)
    assert str(file) in msg and e.file == str(file)
    assert f"row {row}" in msg and str(e.row) == str(row)
    if field is not None:
        assert repr(field) in msg and e.field == field
    assert words in msg, msg


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def garbage_png(path: Path) -> Path:
    path.write_bytes(b"this is not a PNG at all" * 8)
    return path


def train_records(world: Path) -> dict[str, dict]:
    return json.loads((world / "visu" / "train.json").read_text())["data"]


# ============================================================================ ViSU JSON: reading
def test_visu_json_info_data_layout_full_mode(toy_world: Path) -> None:
    qset = load_visu_json(toy_world / "visu" / "train.json", **visu_kw(toy_world))
    raw = train_records(toy_world)
    assert qset.mode is Mode.FULL and len(qset) == len(raw) == 96
    assert qset.skips is not None and qset.skips.count == 0
    q = qset[3]
    r = raw["3"]
    assert (q.id, q.safe_caption, q.unsafe_caption, q.tag) == ("3", r["safe"], r["nsfw"], r["tag"])
    assert q.safe_image == toy_world / "visu" / "train2017" / f"{r['coco_id']:012d}.png"
    assert q.unsafe_image == toy_world / "visu" / r["nsfw_im_path"]
    assert q.safe_image.is_absolute() and q.unsafe_image.is_file()
    # unknown fields are kept, with the COCO id
    assert q.meta["safe_scene"] == r["safe_scene"] and q.meta["nsfw_scene"] == r["nsfw_scene"]
    assert q.meta["coco_id"] == r["coco_id"]


@pytest.mark.parametrize("split,coco_dir", [("validation", "val2017"), ("test", "test2017")])
def test_visu_json_index_keyed_layout(toy_world: Path, split: str, coco_dir: str) -> None:
    path = toy_world / "visu" / f"{split}.json"
    raw = json.loads(path.read_text())
    assert "data" not in raw and "0" in raw  # the other layout
    text = load_visu_json(path)
    assert text.mode is Mode.TEXT and len(text) == 24
    assert all(q.safe_image is None and q.unsafe_image is None for q in text)
    assert text.unsafe_captions == [raw[k]["nsfw"] for k in sorted(raw, key=int)]  # index order
    images = load_visu_json(path, image_root=toy_world / "visu", split_dir=coco_dir, image_ext="png")
    assert images.mode is Mode.SAFE_IMAGES
    assert all(q.safe_image.is_file() and q.unsafe_image is None for q in images)


def test_visu_json_list_layout_and_split_dir_none(toy_world: Path, tmp_path: Path) -> None:
    records = list(train_records(toy_world).values())[:10]
    path = write_json(tmp_path / "list.json", records)
    qset = load_visu_json(path, image_root=toy_world / "visu" / "train2017", image_ext=".png")
    assert [q.id for q in qset] == [str(i) for i in range(10)]
    assert qset.mode is Mode.SAFE_IMAGES and all(q.safe_image.is_file() for q in qset)
    # coco_id as a digit string is an id too
    records[0]["coco_id"] = str(records[0]["coco_id"])
    assert load_visu_json(write_json(path, records))[0].meta["coco_id"] == records[1]["coco_id"] - 1


def test_mode_resolution(toy_world: Path) -> None:
    path, kw = toy_world / "visu" / "train.json", visu_kw(toy_world)
    assert load_visu_json(path, mode="text", **kw).mode is Mode.TEXT  # roots given but ignored on request
    assert load_visu_json(path, mode="safe_images", **kw)[0].unsafe_image is None
    with pytest.raises(ValueError, match="unsafe_image_root"):
        load_visu_json(path, image_root=kw["image_root"], mode="full")
    with pytest.raises(ValueError, match="image_root"):
        load_visu_json(path, unsafe_image_root=kw["unsafe_image_root"])  # auto cannot silently drop them
    with pytest.raises(ValueError, match="mode"):
        load_visu_json(path, mode="images")
    with pytest.raises(ValueError, match="on_error"):
        load_visu_json(path, on_error="ignore")


# ============================================================================ tables: reading
@pytest.fixture(scope="module")
def table_copies(toy_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """visu_text/train.csv, also converted to JSONL and Parquet."""
    out = tmp_path_factory.mktemp("tables")
    csv_path = toy_world / "visu_text" / "train.csv"
    df = pd.read_csv(csv_path)
    df.to_json(out / "train.jsonl", orient="records", lines=True)
    df.to_parquet(out / "train.parquet", index=False)
    return {"csv": csv_path, "jsonl": out / "train.jsonl", "parquet": out / "train.parquet"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_visu_text_table_formats(toy_world: Path, table_copies: dict[str, Path], fmt: str) -> None:
    reference = load_visu_json(toy_world / "visu" / "train.json")
    qset = load_visu_table(table_copies[fmt])
    assert qset.mode is Mode.TEXT and len(qset) == len(reference)
    assert qset.safe_captions == reference.safe_captions
    assert qset.unsafe_captions == reference.unsafe_captions
    assert [q.tag for q in qset] == [q.tag for q in reference]
    assert [q.id for q in qset] == [str(i) for i in range(len(qset))]
    assert [q.meta["coco_id"] for q in qset] == [q.meta["coco_id"] for q in reference]
    assert qset[5].meta["prompt_id"] == 5
    kw = dict(image_root=toy_world / "visu", split_dir="train2017", image_ext=".png")
    with_images = load_visu_table(table_copies[fmt], **kw)
    assert with_images.mode is Mode.SAFE_IMAGES
    reference = load_visu_json(toy_world / "visu" / "train.json", **kw)
    assert [q.safe_image for q in with_images] == [q.safe_image for q in reference]


def test_load_quadruplets_dispatches_on_suffix(toy_world: Path, table_copies: dict[str, Path], tmp_path: Path) -> None:
    json_set = load_quadruplets(toy_world / "visu" / "train.json")
    assert len(json_set) == 96 and json_set.source == str(toy_world / "visu" / "train.json")
    for path in table_copies.values():
        table_set = load_quadruplets(path)
        assert table_set.source == str(path) and table_set.unsafe_captions == json_set.unsafe_captions
    kw = dict(image_root=toy_world / "visu", split_dir="train2017", image_ext=".png")
    assert load_quadruplets(table_copies["parquet"], **kw).mode is Mode.SAFE_IMAGES
    odd = tmp_path / "train.xlsx"
    odd.write_text("x")
    with pytest.raises(DataFormatError, match="unknown format"):
        load_quadruplets(odd)


def test_hf_datasets_folder(table_copies: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install \"saferclip\[datasets\]\""):
        load_quadruplets(folder)

    rows = pd.read_parquet(table_copies["parquet"]).to_dict("records")
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: {"train": rows, "test": rows[:3]}  # a DatasetDict is a dict of splits
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert len(load_quadruplets(folder, split="test")) == 3
    with pytest.raises(DataFormatError, match="split"):
        load_quadruplets(folder)


# ============================================================================ NSFW-Caps, zero-shot: reading
def test_nsfw_caps(toy_world: Path, tmp_path: Path) -> None:
    table = toy_world / "nsfw_caps" / "nsfw_caps.csv"
    text = load_nsfw_caps(table)
    assert len(text) == 40 and not text.has_images and not text.has_nsfw_images
    rows = list(csv.DictReader(table.open()))
    assert text.captions == [r["caption"] for r in rows] and text.nsfw_captions == [r["nsfw_caption"] for r in rows]
    assert text[0].category == rows[0]["chosen_category"]
    assert text[0].meta["image_coco_url"] == rows[0]["image_coco_url"]

    pairs = load_nsfw_caps(table, image_root=toy_world / "nsfw_caps" / "images")
    assert pairs.has_images and pairs.has_nsfw_images
    assert pairs[0].image == toy_world / "nsfw_caps" / "images" / rows[0]["image_coco_url"].rsplit("/", 1)[1]
    assert pairs[0].nsfw_image == toy_world / "nsfw_caps" / rows[0]["nsfw_image_path"]
    images = CaptionPairImages(pairs, to_tensor, which="unsafe")
    assert images[0].shape == (3, 32, 32)

    # the real benchmark has no nsfw_image_path column
    real = tmp_path / "nsfw_caps.parquet"
    pd.read_csv(table).drop(columns=["nsfw_image_path"]).to_parquet(real)
    real_pairs = load_nsfw_caps(real, image_root=toy_world / "nsfw_caps" / "images")
    assert real_pairs.has_images and not real_pairs.has_nsfw_images
    with pytest.raises(ValueError, match="nsfw_image"):
        CaptionPairImages(real_pairs, to_tensor, which="unsafe")


def test_zero_shot_image_folders(toy_world: Path) -> None:
    for root in sorted((toy_world / "zeroshot").iterdir()):
        task = load_image_folder_task(root)
        assert task.name == root.name and task.classnames == json.loads((root / "classnames.json").read_text())
        assert all("{c}" in t for t in task.templates)
        for path, label in task.samples:
            assert path.parent.name == task.classnames[label].replace(" ", "_")
    task = load_image_folder_task(toy_world / "zeroshot" / "colour")
    image, label = ZeroShotImages(task, to_tensor)[len(task.samples) - 1]
    assert image.shape == (3, 32, 32) and label == len(task.classnames) - 1


def test_plain_image_folder(toy_world: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(toy_world / "zeroshot" / "colour" / "test", tmp_path / "plain" / "test")
    task = load_image_folder_task(tmp_path / "plain")
    assert task.classnames == sorted(json.loads((toy_world / "zeroshot" / "colour" / "classnames.json").read_text()))
    assert "red shape" in task.classnames  # underscores read as spaces
    assert task.templates == ["a photo of a {c}."]


def _write_shards(task, folder: Path, n_shards: int = 2) -> str:
    folder.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for i, (path, label) in enumerate(task.samples[s::n_shards]):
                key = f"s{s}_{i:05d}"
                tar.add(path, arcname=f"{key}.png")
                cls = folder / "label.cls"
                cls.write_text(f"{label}\n")
                tar.add(cls, arcname=f"{key}.cls")
    return f"{folder}/{{000..{n_shards - 1:03d}}}.tar"


def test_webdataset_shards(toy_world: Path, tmp_path: Path) -> None:
    root = toy_world / "zeroshot" / "shape"
    folder_task = load_image_folder_task(root)
    pattern = _write_shards(folder_task, tmp_path / "wds")
    task = load_webdataset_task(pattern, root / "classnames.json", root / "templates.json", name="shape")
    assert task.classnames == folder_task.classnames and len(task.samples) == len(folder_task.samples)
    assert sorted(label for _, label in task.samples) == sorted(label for _, label in folder_task.samples)
    data = ZeroShotImages(task, to_tensor)
    ref, label = task.samples[0]
    image, got = data[0]
    assert got == label and image.shape == (3, 32, 32)
    expected = to_tensor(Image.open(folder_task.samples[0][0]).convert("RGB"))
    assert torch.equal(image, expected)  # shard 000 starts with the folder task's first sample
    with pytest.raises(DataFormatError, match="class index"):
        load_webdataset_task(pattern, ["circle", "square"], root / "templates.json")


def test_torchvision_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataFormatError, match="download=True"):
        load_torchvision_task("cifar10", tmp_path, ["a photo of a {c}."])

    # a tiny stand-in for the python CIFAR-10 files (torchvision checks md5s: pretend they match)
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(20)]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    task = load_torchvision_task("cifar10", tmp_path, ["a photo of a {c}."])
    assert task.classnames == names and len(task.samples) == 20 and task.samples[3][1] == 3
    image, label = ZeroShotImages(task, to_tensor)[3]
    assert image.shape == (3, 32, 32) and label == 3
    with pytest.raises(DataFormatError, match="10 classes"):
        load_torchvision_task("cifar10", tmp_path, ["a {c}"], classnames=["a", "b"])


def test_quadruplet_images(toy_world: Path, tmp_path: Path) -> None:
    qset = load_visu_json(toy_world / "visu" / "validation.json", **visu_kw(toy_world, "val2017"))
    safe, unsafe = QuadrupletImages(qset, to_tensor, "safe"), QuadrupletImages(qset, to_tensor, "unsafe")
    assert len(safe) == len(unsafe) == 24
    assert safe[0].shape == unsafe[0].shape == (3, 32, 32) and not torch.equal(safe[0], unsafe[0])
    with pytest.raises(ValueError, match="no unsafe images"):
        QuadrupletImages(load_visu_json(toy_world / "visu" / "validation.json"), to_tensor, "unsafe")

    # an unreadable image passes the cheap load-time check, and is refused when read
    records = json.loads((toy_world / "visu" / "validation.json").read_text())
    bad = garbage_png(tmp_path / "garbage.png")
    records["7"]["nsfw_im_path"] = str(bad)
    qset = load_visu_json(write_json(tmp_path / "v.json", records), **visu_kw(toy_world, "val2017"))
    with pytest.raises(DataFormatError, match="cannot read image") as err:
        QuadrupletImages(qset, to_tensor, "unsafe")[7]
    assert_names(err, bad, 7, "unsafe_image", "cannot read image")


# ============================================================================ ViSU JSON: refusing
def _set(field: str, value: Any) -> Callable[[dict, Path], None]:
    def apply(rec: dict, tmp: Path) -> None:
        rec[field] = value(tmp) if callable(value) else value

    return apply


def _drop(field: str) -> Callable[[dict, Path], None]:
    return lambda rec, tmp: rec.pop(field)


# defect -> (edit of one record, field named, words in the message)
JSON_DEFECTS = {
    "missing field": (_drop("nsfw"), "nsfw", "missing field"),
    "coco_id not an int": (_set("coco_id", "12a"), "coco_id", "non-negative integer"),
    "coco_id a list": (_set("coco_id", [1]), "coco_id", "non-negative integer"),
    "caption not a string": (_set("safe", 42), "safe", "as a string"),
    "empty caption": (_set("nsfw", "   "), "nsfw", "empty unsafe caption"),
    "missing safe image": (_set("coco_id", 987654321), "coco_id", "image not found"),
    "missing unsafe image": (_set("nsfw_im_path", "nsfw/train/nope.png"), "nsfw_im_path", "image not found"),
    "unreadable image": (
        _set("nsfw_im_path", lambda tmp: str(garbage_png(tmp / "bad.png"))),
        "nsfw_im_path",
        "cannot read image",
    ),
}


@pytest.mark.parametrize("defect", sorted(JSON_DEFECTS))
def test_visu_json_refuses_malformed_record(toy_world: Path, tmp_path: Path, defect: str) -> None:
    edit, field, words = JSON_DEFECTS[defect]
    payload = json.loads((toy_world / "visu" / "train.json").read_text())
    edit(payload["data"]["5"], tmp_path)
    path = write_json(tmp_path / "train.json", payload)
    with pytest.raises(DataFormatError, match=re.escape(words)) as err:
        load_visu_json(path, verify_images=True, **visu_kw(toy_world))
    assert_names(err, path, 5, field, words)


def test_visu_json_skips_and_reports_every_malformed_record(toy_world: Path, tmp_path: Path) -> None:
    records = train_records(toy_world)
    bad_rows = {}
    for row, defect in zip(("2", "11", "20", "33", "47", "58", "60", "95"), sorted(JSON_DEFECTS)):
        JSON_DEFECTS[defect][0](records[row], tmp_path)
        bad_rows[row] = JSON_DEFECTS[defect][1]
    # a duplicated record id, written by hand (json.dumps cannot)
    body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in records.items())
    path = tmp_path / "train.json"
    path.write_text("{" + body + f',\n"3": {json.dumps(records["4"])}' + "}")

    with pytest.raises(DataFormatError, match=r"train\.json.*row 2\b") as err:
        load_visu_json(path, mode="text")
    assert err.value.row == "2"  # the first bad row stops a strict load
    qset = load_visu_json(path, on_error="skip", verify_images=True, **visu_kw(toy_world))
    assert len(qset) == 96 - len(bad_rows)
    assert qset.skips.count == len(bad_rows) + 1
    reasons = dict(qset.skips.skipped)
    assert sorted(reasons, key=int) == sorted([*bad_rows, "3"], key=int)
    for row, field in bad_rows.items():
        assert f"{path}, row {row}, field {field!r}" in reasons[row]
    assert "duplicate id '3' (first seen at row 3)" in reasons["3"]
    assert "skipped 9 malformed rows" in qset.skips.summary()
    assert {q.id for q in qset}.isdisjoint(bad_rows)
    assert sum(q.id == "3" for q in qset) == 1


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_truncated_json_is_refused_whole(toy_world: Path, tmp_path: Path, on_error: str) -> None:
    data = (toy_world / "visu" / "test.json").read_bytes()
    path = tmp_path / "test.json"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="invalid JSON at line") as err:
        load_visu_json(path, on_error=on_error)
    assert err.value.file == str(path)


def test_no_valid_rows_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "bad.json", {"0": {"safe": "a", "nsfw": ""}, "1": "not a record"})
    with pytest.raises(DataFormatError, match="no valid rows.*skipped 2"):
        load_visu_json(path, on_error="skip")
    with pytest.raises(DataFormatError, match="no valid rows"):
        load_visu_json(write_json(tmp_path / "empty.json", {"info": {}, "data": {}}))


# ============================================================================ tables: refusing
def _csv_lines(toy_world: Path) -> list[str]:
    return (toy_world / "visu_text" / "train.csv").read_text().splitlines()


# defect -> (replacement of data row 4, field named, words); row 4 is line 5 (after the header)
CSV_DEFECTS = {
    "coco_id not an int": ("4,a cat,a gun,abc,weapons,4", "coco_id", "non-negative integer"),
    "empty caption": ('4,"  ",a gun,5,weapons,4', "safe", "empty safe caption"),
    "missing cells": ("4,a cat,a gun", "coco_id", "3 of 6 cells"),
    "empty tag": ("4,a cat,a gun,5,,4", "tag", "empty NSFW category tag"),
    "duplicate id": ("2,a cat,a gun,5,weapons,4", "incremental_id", "duplicate id '2'"),
    "negative prompt_id": ("4,a cat,a gun,5,weapons,-1", "prompt_id", "non-negative integer"),
}


@pytest.mark.parametrize("defect", sorted(CSV_DEFECTS))
def test_csv_refuses_malformed_row(toy_world: Path, tmp_path: Path, defect: str) -> None:
    line, field, words = CSV_DEFECTS[defect]
    lines = _csv_lines(toy_world)
    lines[5] = line
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=re.escape(words)) as err:
        load_visu_table(path)
    assert_names(err, path, 5, field, words)
    qset = load_visu_table(path, on_error="skip")
    assert len(qset) == 95 and qset.skips.count == 1 and qset.skips.skipped[0][0] == "5"


def test_csv_extra_cells_missing_column_and_truncation(toy_world: Path, tmp_path: Path) -> None:
    lines = _csv_lines(toy_world)
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines[:5] + ["9,a,b,1,weapons,9,surplus"] + lines[6:]) + "\n")
    with pytest.raises(DataFormatError, match="more cells than the header") as err:
        load_visu_table(path)
    assert err.value.row == 5
    path.write_text("\n".join([lines[0].replace(",tag", ",category")] + lines[1:]) + "\n")
    with pytest.raises(DataFormatError, match="missing column.*'tag'") as err:
        load_visu_table(path, on_error="skip")  # a missing column is the file's fault, not a row's
    assert err.value.field == "tag"
    path.write_text("\n".join(lines[:10]) + '\n10,"an unterminated caption')
    with pytest.raises(DataFormatError, match="invalid CSV"):
        load_visu_table(path, on_error="skip")


def test_jsonl_wrong_types_and_bad_lines(table_copies: dict[str, Path], tmp_path: Path) -> None:
    lines = table_copies["jsonl"].read_text().splitlines()
    rec = json.loads(lines[2])
    rec["nsfw"] = ["not", "a", "string"]
    lines[2] = json.dumps(rec)
    lines[6] = lines[6][: len(lines[6]) // 2]  # a cut line
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match="unsafe caption as a string, got list") as err:
        load_visu_table(path)
    assert_names(err, path, 3, "nsfw", "unsafe caption as a string, got list")
    qset = load_visu_table(path, on_error="skip")
    assert len(qset) == 94 and [row for row, _ in qset.skips.skipped] == ["3", "7"]
    assert "invalid JSON line" in qset.skips.skipped[1][1]


def test_parquet_wrong_type_and_truncation(table_copies: dict[str, Path], tmp_path: Path) -> None:
    df = pd.read_parquet(table_copies["parquet"])
    df["coco_id"] = df["coco_id"].astype(str)
    df.loc[8, "coco_id"] = "x8"
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False)
    with pytest.raises(DataFormatError, match="got str 'x8'") as err:
        load_visu_table(path)
    assert_names(err, path, 9, "coco_id", "got str 'x8'")
    assert len(load_visu_table(path, on_error="skip")) == 95

    data = table_copies["parquet"].read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataFormatError, match="cannot read Parquet") as err:
            load_visu_table(cut, on_error=on_error)
        assert err.value.file == str(cut)


# ============================================================================ NSFW-Caps, zero-shot: refusing
def test_nsfw_caps_refuses_and_skips(toy_world: Path, tmp_path: Path) -> None:
    df = pd.read_csv(toy_world / "nsfw_caps" / "nsfw_caps.csv")
    df.loc[1, "caption"] = " "
    df.loc[4, "image_coco_url"] = "https://toy.invalid/nocaps/val/missing.png"
    df.loc[6, "nsfw_image_path"] = str(garbage_png(tmp_path / "garbage.png"))
    path = tmp_path / "caps.jsonl"
    df.to_json(path, orient="records", lines=True)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[9])
    rec["chosen_category"] = 3
    lines[9] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    kw = dict(image_root=toy_world / "nsfw_caps" / "images", nsfw_image_root=toy_world / "nsfw_caps")
    with pytest.raises(DataFormatError, match="empty safe caption") as err:
        load_nsfw_caps(path, **kw)
    assert_names(err, path, 2, "caption", "empty safe caption")
    pairs = load_nsfw_caps(path, on_error="skip", verify_images=True, **kw)
    assert len(pairs) == 36
    reasons = dict(pairs.skips.skipped)
    assert set(reasons) == {"2", "5", "7", "10"}
    assert "field 'image_coco_url': image not found" in reasons["5"]
    assert "field 'nsfw_image_path': " in reasons["7"] and "garbage.png: cannot read image" in reasons["7"]
    assert "field 'chosen_category': expected NSFW category as a string, got int" in reasons["10"]


def _zeroshot_copy(toy_world: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(toy_world / "zeroshot" / "shape", tmp_path / "shape"))


def test_zero_shot_refusals(toy_world: Path, tmp_path: Path) -> None:
    root = _zeroshot_copy(toy_world, tmp_path)
    write_json(root / "templates.json", ["a photo of a {c}.", "a picture of a shape."])
    with pytest.raises(DataFormatError, match=r"row 1, field 'templates'.*no '\{c\}'"):
        load_image_folder_task(root)
    with pytest.raises(DataFormatError, match="no '{c}'"):
        load_image_folder_task(root, templates=["{c}", "nothing"])
    write_json(root / "templates.json", ["a {c}"])

    (root / "classnames.json").write_text('["circle", "square", "tri')
    with pytest.raises(DataFormatError, match="classnames.json: invalid JSON"):
        load_image_folder_task(root)
    write_json(root / "classnames.json", ["circle", "square", "triangle", "diamond", "cross"])
    with pytest.raises(DataFormatError, match="ring: class folder is not a listed class name"):
        load_image_folder_task(root)
    write_json(root / "classnames.json", ["circle", "square", "triangle", "diamond", "cross", "ring", "star"])
    with pytest.raises(DataFormatError, match="star: class 'star' has no images"):
        load_image_folder_task(root)
    (root / "test" / "star").mkdir()
    (root / "test" / "star" / "notes.txt").write_text("not an image")
    with pytest.raises(DataFormatError, match="class 'star' has no images"):
        load_image_folder_task(root)
    (root / "test" / "star" / "0000.png").write_bytes((root / "test" / "ring" / "0000.png").read_bytes())
    assert len(load_image_folder_task(root).classnames) == 7

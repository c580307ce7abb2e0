"""The frozen-embedding cache: equal to a plain encode loop, reused when nothing changed,
rebuilt on any change of model, data or preprocessing, atomic, and loud about bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import transforms

import saferclip.redirection.cache_format as cache_format
from saferclip.data.records import DataFormatError, Mode, Quadruplet, QuadrupletSet
from saferclip.data.safe_corpus import load_safe_corpus
from saferclip.model.build import build_clip, encode_text
from saferclip.redirection.cache import build_or_load_cache, embed_plain
from saferclip.redirection.cache_format import EmbeddingError
from saferclip.redirection.cache_key import data_fingerprint


def toy_set(world: Path, mode: Mode = Mode.FULL, split: str = "train", limit: int | None = None) -> QuadrupletSet:
    """Quadruplets straight from the toy world's ViSU JSON (independent of the loaders under test elsewhere)."""
    payload = json.loads((world / "visu" / f"{split}.json").read_text())
    records = payload.get("data", payload)
    coco = {"train": "train2017", "validation": "val2017", "test": "test2017"}[split]
    items = [
        Quadruplet(
            id=key,
            safe_caption=r["safe"],
            unsafe_caption=r["nsfw"],
            safe_image=world / "visu" / coco / f"{r['coco_id']:012d}.png" if mode.has_safe_images else None,
            unsafe_image=world / "visu" / r["nsfw_im_path"] if mode.has_unsafe_images else None,
            tag=r["tag"],
            meta={"safe_scene": r["safe_scene"], "nsfw_scene": r["nsfw_scene"]},
        )
        for key, r in list(records.items())[:limit]
    ]
    return QuadrupletSet(items, mode, f"{world}/visu/{split}.json")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_clip("saferclip-micro")


def _subfolders(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_cache_matches_plain_loop_and_is_reused(toy_world, micro, tmp_path):
    qset = toy_set(toy_world, Mode.FULL, limit=40)
    cache = build_or_load_cache(micro, qset, tmp_path, batch_size=16, progress=False)
    assert not cache.was_reused and cache.path == tmp_path / cache.key
    reference = embed_plain(micro, qset, batch_size=7)
    for name, expected in reference.items():
        got = getattr(cache, name)
        assert got.shape == (40, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert set(cache.meta["counts"]) == {"safe_text", "unsafe_text", "safe_image", "unsafe_image"}
    assert cache.meta["model"]["arch"] == "saferclip-micro" and "Normalize" in cache.meta["preprocess"]

    again = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert again.was_reused and again.key == cache.key
    torch.testing.assert_close(again.unsafe_image, cache.unsafe_image, atol=0, rtol=0)
    again.safe_text[0] += 1  # copy-on-write: the file keeps its values
    assert torch.equal(build_or_load_cache(micro, qset, tmp_path, progress=False).safe_text, cache.safe_text)
    assert _subfolders(tmp_path) == [cache.key]  # no leftovers, one cache


def test_modes_store_what_they_provide(toy_world, micro, tmp_path):
    text = build_or_load_cache(micro, toy_set(toy_world, Mode.TEXT, limit=10), tmp_path, progress=False)
    assert text.safe_image is None and text.unsafe_image is None
    half = build_or_load_cache(micro, toy_set(toy_world, Mode.SAFE_IMAGES, limit=10), tmp_path, progress=False)
    assert half.safe_image.shape == (10, 32) and half.unsafe_image is None
    assert text.key != half.key
    torch.testing.assert_close(text.unsafe_text, half.unsafe_text, atol=0, rtol=0)


def test_rebuilt_when_weights_data_or_preprocessing_change(toy_world, micro, tmp_path):
    # a private copy of the images, so one can be rewritten
    world = tmp_path / "world"
    shutil.copytree(toy_world / "visu", world / "visu")
    qset = toy_set(world, Mode.FULL, limit=12)
    cache_dir = tmp_path / "cache"
    base = build_or_load_cache(micro, qset, cache_dir, progress=False)
    keys = {base.key}

    changed_weights = build_clip("saferclip-micro")
    changed_weights.model.load_state_dict(micro.model.state_dict())
    with torch.no_grad():
        changed_weights.model.text_projection[0, 0] += 1e-3
    keys.add(build_or_load_cache(changed_weights, qset, cache_dir, progress=False).key)

    items = list(qset.items)
    items[5] = dataclasses.replace(items[5], unsafe_caption=items[5].unsafe_caption + " today")
    caption = build_or_load_cache(micro, QuadrupletSet(items, qset.mode, qset.source), cache_dir, progress=False)
    keys.add(caption.key)
    assert not torch.equal(caption.unsafe_text[5], base.unsafe_text[5])
    torch.testing.assert_close(caption.unsafe_text[4], base.unsafe_text[4])

    image = qset[3].unsafe_image
    shutil.copyfile(qset[4].unsafe_image, image)  # new content, new mtime
    rewritten = build_or_load_cache(micro, qset, cache_dir, progress=False)
    keys.add(rewritten.key)
    assert not rewritten.was_reused
    torch.testing.assert_close(rewritten.unsafe_image[3], rewritten.unsafe_image[4])

    preprocess = transforms.Compose([*micro.preprocess.transforms[:-1], transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    keys.add(
        build_or_load_cache(dataclasses.replace(micro, preprocess=preprocess), qset, cache_dir, progress=False).key
    )

    half = build_or_load_cache(micro, qset, cache_dir, progress=False, dtype="float16")
    keys.add(half.key)
    assert half.safe_image.dtype == torch.float16
    torch.testing.assert_close(half.safe_image.float(), rewritten.safe_image, atol=2e-3, rtol=0)
    assert len(keys) == 6 and len(_subfolders(cache_dir)) == 6

    assert build_or_load_cache(micro, qset, cache_dir, progress=False, dtype="float16").was_reused


def test_content_fingerprint_sees_a_rewrite_that_keeps_size_and_mtime(toy_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(toy_world / "visu", world / "visu")
    qset = toy_set(world, Mode.SAFE_IMAGES, limit=4)
    before = {how: data_fingerprint(qset, image_fingerprint=how) for how in ("stat", "content")}
    path = qset[0].safe_image
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime, as cp -p would
    assert data_fingerprint(qset, image_fingerprint="stat") == before["stat"]  # the documented blind spot
    assert data_fingerprint(qset, image_fingerprint="content") != before["content"]


def test_interrupted_write_leaves_previous_cache_usable(toy_world, micro, tmp_path, monkeypatch):
    qset = toy_set(toy_world, Mode.FULL, limit=10)
    good = build_or_load_cache(micro, qset, tmp_path, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing meta.json")

    monkeypatch.setattr(cache_format, "write_json_atomic", crash)  # arrays written, meta not yet
    other = QuadrupletSet(
        [dataclasses.replace(q, safe_caption=q.safe_caption + ".") for q in qset], qset.mode, qset.source
    )
    with pytest.raises(KeyboardInterrupt, match="power cut while writing meta.json"):
        build_or_load_cache(micro, other, tmp_path, progress=False)
    assert _subfolders(tmp_path) == [good.key]  # no half cache, no temporary folder left behind
    monkeypatch.undo()

    reused = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert reused.was_reused
    torch.testing.assert_close(reused.safe_image, good.safe_image, atol=0, rtol=0)
    assert not build_or_load_cache(micro, other, tmp_path, progress=False).was_reused


def test_damaged_cache_is_rebuilt_not_trusted(toy_world, micro, tmp_path):
    qset = toy_set(toy_world, Mode.TEXT, limit=6)
    first = build_or_load_cache(micro, qset, tmp_path, progress=False)
    (first.path / "unsafe_text.npy").unlink()
    second = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert not second.was_reused and second.key == first.key
    torch.testing.assert_close(second.unsafe_text, encode_text(micro, qset.unsafe_captions))
    (second.path / "meta.json").write_text('{"format_version": 1, "key": "%s"}' % second.key)
    third = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert not third.was_reused and third.meta["counts"]["unsafe_text"] == 6
    assert _subfolders(tmp_path) == [first.key]


def test_extra_safe_captions_are_embedded_and_keyed(toy_world, micro, tmp_path):
    qset = toy_set(toy_world, Mode.TEXT, limit=6)
    extra = ["a red circle on a white background", "a blue square with a cup"]
    cache = build_or_load_cache(micro, qset, tmp_path, progress=False, extra_safe_captions=extra)
    assert cache.extra_safe_captions == extra
    torch.testing.assert_close(cache.extra_safe_text, encode_text(micro, extra))
    assert build_or_load_cache(micro, qset, tmp_path, progress=False).key != cache.key
    assert build_or_load_cache(micro, qset, tmp_path, progress=False, extra_safe_captions=extra).was_reused


def test_non_finite_embedding_names_the_item(toy_world, micro, tmp_path, monkeypatch):
    qset = toy_set(toy_world, Mode.TEXT, limit=10)
    import saferclip.redirection.cache as cache_module

    real = cache_module.encode_tokens

    def poisoned(model, tokens, normalize=True):
        out = real(model, tokens, normalize=normalize)
        if len(tokens) == 4:  # the last batch of 10 in batches of 6: rows 6..9
            out[1, 0] = float("nan")
        return out

    monkeypatch.setattr(cache_module, "encode_tokens", poisoned)
    with pytest.raises(EmbeddingError, match=rf"safe text embedding for item 7 \(id {qset[7].id}\)"):
        build_or_load_cache(micro, qset, tmp_path, batch_size=6, progress=False)
    assert _subfolders(tmp_path) == []


def test_bad_inputs_have_clear_errors(toy_world, micro, tmp_path):
    qset = toy_set(toy_world, Mode.FULL, limit=4)
    missing = [dataclasses.replace(qset[0], unsafe_image=tmp_path / "gone.png"), *qset.items[1:]]
    with pytest.raises(DataFormatError, match=r"gone\.png.*image file not found"):
        build_or_load_cache(micro, QuadrupletSet(missing, Mode.FULL, "x"), tmp_path / "c", progress=False)
    no_image = [dataclasses.replace(qset[0], safe_image=None), *qset.items[1:]]
    with pytest.raises(DataFormatError, match="needs a safe image"):
        build_or_load_cache(micro, QuadrupletSet(no_image, Mode.FULL, "x"), tmp_path / "c", progress=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [dataclasses.replace(qset[0], safe_image=broken), *qset.items[1:]]
    with pytest.raises(DataFormatError, match=r"broken\.png, row \S+, field 'safe_image': cannot read image"):
        build_or_load_cache(micro, QuadrupletSet(bad, Mode.FULL, "x"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="empty"):
        build_or_load_cache(micro, QuadrupletSet([], Mode.TEXT, "none"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        build_or_load_cache(micro, qset, tmp_path / "c", progress=False, dtype="int8")
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "c").iterdir())


def test_load_safe_corpus_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a red circle\n\n  a blue square  \n")
    assert load_safe_corpus(tmp_path / "a.txt") == ["a red circle", "a blue square"]
    (tmp_path / "b.csv").write_text("id,caption\n1,a red circle\n2,a cup\n")
    assert load_safe_corpus(tmp_path / "b.csv") == ["a red circle", "a cup"]
    (tmp_path / "c.json").write_text(json.dumps([{"safe": "x y"}, {"safe": "z"}]))
    assert load_safe_corpus(tmp_path / "c.json") == ["x y", "z"]
    (tmp_path / "d.json").write_text(json.dumps({"captions": ["p", "q"]}))
    assert load_safe_corpus(tmp_path / "d.json") == ["p", "q"]
    (tmp_path / "e.jsonl").write_text('"p"\n{"text": "q"}\n')
    assert load_safe_corpus(tmp_path / "e.jsonl") == ["p", "q"]

    (tmp_path / "f.csv").write_text("id,words\n1,a\n")
    with pytest.raises(DataFormatError, match=r"f\.csv.*no caption column.*\['id', 'words'\]"):
        load_safe_corpus(tmp_path / "f.csv")
    with pytest.raises(DataFormatError, match="no column 'nope'"):
        load_safe_corpus(tmp_path / "b.csv", column="nope")
    (tmp_path / "g.csv").write_text('caption\nfine\n\n""\n')  # the blank line is skipped, the "" is not
    with pytest.raises(DataFormatError, match=r"g\.csv, row 4.*empty or missing caption"):
        load_safe_corpus(tmp_path / "g.csv")
    (tmp_path / "h.json").write_text("[1, 2]")
    with pytest.raises(DataFormatError, match=r"h\.json, row 0: expected a string"):
        load_safe_corpus(tmp_path / "h.json")
    (tmp_path / "i.txt").write_text("\n\n")
    with pytest.raises(DataFormatError, match="holds no captions"):
        load_safe_corpus(tmp_path / "i.txt")
    with pytest.raises(DataFormatError, match="unknown corpus format"):
        (tmp_path / "a.txt.gz").write_text("x")
        load_safe_corpus(tmp_path / "a.txt.gz")
    with pytest.raises(DataFormatError, match="not found"):
        load_safe_corpus(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- integrity (checksums)
def _flip_bytes(path: Path, offset_from_end: int = 64, n: int = 16) -> None:
    """Flip ``n`` bytes inside the array data (the .npy header stays intact), keeping size and mtime."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + n):
        data[i] ^= 0x5A
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flip", "nan"])
def test_damaged_array_is_detected_warned_and_rebuilt(toy_world, micro, tmp_path, caplog, damage):
    import numpy as np

    from saferclip import integrity

    qset = toy_set(toy_world, Mode.TEXT, limit=8)
    first = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert set(first.meta["checksums"]) == {"safe_text.npy", "unsafe_text.npy"}
    expected = first.unsafe_text.clone()
    target = first.path / "unsafe_text.npy"
    del first
    if damage == "flip":
        _flip_bytes(target)
    else:
        arr = np.load(target, mmap_mode="r+")
        arr[3] = np.nan
        arr.flush()
        del arr
    integrity.forget()  # a new process would not remember having verified it
    with caplog.at_level("WARNING"):
        second = build_or_load_cache(micro, qset, tmp_path, progress=False)
    assert not second.was_reused
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "rebuilding" in r.getMessage()]
    assert len(warnings) == 1 and str(target) in warnings[0] and "\n" not in warnings[0]
    assert "checksum mismatch" in warnings[0]
    torch.testing.assert_close(second.unsafe_text, expected, atol=0, rtol=0)
    assert build_or_load_cache(micro, qset, tmp_path, progress=False).was_reused


def test_old_cache_without_checksums_is_rebuilt_once(toy_world, micro, tmp_path, caplog):
    qset = toy_set(toy_world, Mode.TEXT, limit=6)
    first = build_or_load_cache(micro, qset, tmp_path, progress=False)
    meta = json.loads((first.path / "meta.json").read_text())
    del meta["checksums"]
    (first.path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        assert not build_or_load_cache(micro, qset, tmp_path, progress=False).was_reused
    assert any("no checksums recorded" in r.getMessage() for r in caplog.records)
    assert build_or_load_cache(micro, qset, tmp_path, progress=False).was_reused


def test_verified_once_per_process(toy_world, micro, tmp_path, monkeypatch):
    from saferclip import integrity

    qset = toy_set(toy_world, Mode.TEXT, limit=6)
    build_or_load_cache(micro, qset, tmp_path, progress=False)
    integrity.forget()
    calls = []
    real = integrity.digest_file
    monkeypatch.setattr(integrity, "digest_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert build_or_load_cache(micro, qset, tmp_path, progress=False).was_reused
    assert len(calls) == 2  # safe_text.npy and unsafe_text.npy, once each

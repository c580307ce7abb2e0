"""Pre-resized image shards: a row served from the uint8 memory map equals the full preprocessing
of its file (bit for bit), stale or foreign shards are refused (the JPEGs are read instead), and
the datamodule reads the shards the command wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_embedding_cache import toy_set
from train_helpers import compose_train, prepared

from saferclip.app.commands.make_image_shards import make_shards
from saferclip.data.image_shards import ImageShards, write_image_shards
from saferclip.data.images import load_image
from saferclip.data.records import Mode
from saferclip.model.build import build_clip
from saferclip.training.datasets import ValidationDataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def b32_preprocess():
    """ViT-B/32's preprocessing (224 px, bicubic resize, centre crop): no weights needed."""
    from saferclip.model._openclip import open_clip

    return open_clip.image_transform(224, is_train=False, resize_mode="shortest", interpolation="bicubic")


def test_shards_equal_the_full_preprocessing(toy_world, tmp_path, b32_preprocess):
    qset = toy_set(toy_world, Mode.FULL, limit=12)
    paths = [q.safe_image for q in qset] + [q.unsafe_image for q in qset]
    folder = write_image_shards(paths + paths[:3], tmp_path / "shards", b32_preprocess)  # duplicates stored once
    shards = ImageShards.open(folder, b32_preprocess)
    assert shards is not None and shards.images.shape == (len(set(paths)), 224, 224, 3)
    for path in paths:
        expected = b32_preprocess(load_image(path))
        assert expected.shape == (3, 224, 224)
        assert torch.equal(shards.image(path), expected)
    assert Path("/nowhere.png") not in shards
    with pytest.raises(FileExistsError, match="already exists; pass force=True to replace it"):
        write_image_shards(paths, folder, b32_preprocess)


def test_stale_or_foreign_shards_are_refused(toy_world, tmp_path, b32_preprocess, caplog):
    qset = toy_set(toy_world, Mode.FULL, limit=4)
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for q in qset:
        paths.append(images / q.safe_image.name)
        paths[-1].write_bytes(q.safe_image.read_bytes())
    folder = write_image_shards(paths, tmp_path / "shards", b32_preprocess)
    micro = build_clip("saferclip-micro").preprocess  # another size: another preprocessing
    assert ImageShards.open(folder, micro) is None and "another preprocessing" in caplog.text
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed since
    assert ImageShards.open(folder, b32_preprocess) is None
    assert f"{paths[2].name}: changed since the shards" in caplog.text
    data = bytearray((folder / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (folder / "images.npy").write_bytes(bytes(data))
    assert ImageShards.open(folder, b32_preprocess, check_files=False) is None
    assert "images.npy" in caplog.text


def test_datamodule_reads_the_shards_the_command_wrote(toy_world, tmp_path):
    cfg = compose_train(tmp_path, toy_world, "method=safeclip", f"+data.image_shards={tmp_path / 'shards'}")
    written = make_shards(cfg)
    assert set(written) == {"train", "validation"} and written["train"]["images"] > 0
    module, datamodule = prepared(cfg)
    assert datamodule.train_set.image_shards is not None and datamodule.val_set.inner.image_shards is not None
    # the same batch as from the image files
    plain = ValidationDataset(datamodule.val_set.inner.qset, datamodule.tokenizer, datamodule.preprocess)
    rows = list(range(min(6, len(plain))))
    fast, slow = datamodule.val_set.__getitems__(rows), plain.__getitems__(rows)
    assert torch.equal(fast["safe_image"], slow["safe_image"]) and torch.equal(
        fast["unsafe_image"], slow["unsafe_image"]
    )
    batch = datamodule.train_set.__getitems__(rows)
    reference = torch.stack(
        [datamodule.preprocess(load_image(datamodule.train_set.qset[i].unsafe_image)) for i in rows]
    )
    assert torch.equal(batch["unsafe_image"], reference)

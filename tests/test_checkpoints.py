"""Safe loading: every way a weights file can be wrong gets a clear refusal naming it."""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saferclip.files import atomic_path
from saferclip.model.build import build_clip, load_into
from saferclip.model.checkpoints import (
    CheckpointError,
    compact_token_embedding,
    load_state_dict,
    load_torch_checkpoint,
    read_safetensors_metadata,
    save_state_dict,
    sniff_format,
)

WEIGHTS = {"layer.weight": torch.arange(12.0).reshape(3, 4), "layer.bias": torch.ones(3)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def lightning_like(state_dict: dict[str, torch.Tensor], hyper_parameters: object = None) -> dict:
    """What Lightning 2.x writes: weights under ``state_dict`` plus plain bookkeeping."""
    return {
        "epoch": 2,
        "global_step": 300,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_score": torch.tensor(0.25), "dirpath": "/runs/x"}
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(300.0), "exp_avg": torch.zeros(3, 4)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]}],
            }
        ],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters
        if hyper_parameters is not None
        else {"lr": 1e-3, "method": "saferclip", "towers": ["text"]},
    }


# ---------------------------------------------------------------- files that load


def test_safetensors_and_torch_files_round_trip(tmp_path):
    save_state_dict(WEIGHTS, tmp_path / "w.safetensors", metadata={"arch": "saferclip-micro"})
    assert_same(load_state_dict(tmp_path / "w.safetensors"), WEIGHTS)
    assert read_safetensors_metadata(tmp_path / "w.safetensors") == {"arch": "saferclip-micro"}
    torch.save(WEIGHTS, tmp_path / "w.pt")
    torch.save(WEIGHTS, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(WEIGHTS, tmp_path / "named_wrongly.safetensors")  # the content decides, not the name
    for name in ("w.pt", "legacy.pth", "named_wrongly.safetensors"):
        assert_same(load_state_dict(tmp_path / name), WEIGHTS)
    assert sniff_format(tmp_path / "legacy.pth") == "torch-legacy"


def test_ddp_prefix_is_stripped(tmp_path):
    torch.save({"state_dict": {f"module.{k}": v for k, v in WEIGHTS.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    assert_same(load_state_dict(tmp_path / "ddp.pt"), WEIGHTS)


def test_lightning_checkpoint_is_unwrapped_and_prefix_selected(tmp_path):
    sd = {**{f"model.{k}": v for k, v in WEIGHTS.items()}, "teacher.layer.weight": torch.zeros(3, 4)}
    torch.save(lightning_like(sd), tmp_path / "last.ckpt")
    assert set(load_state_dict(tmp_path / "last.ckpt")) == set(sd)
    assert_same(load_state_dict(tmp_path / "last.ckpt", prefix="model."), WEIGHTS)
    assert_same(load_state_dict(tmp_path / "last.ckpt", prefix="model"), WEIGHTS)
    with pytest.raises(
        CheckpointError,
        match=r"last\.ckpt: no weights under prefix 'student\.'; the prefixes present are model\., teacher\.",
    ):
        load_state_dict(tmp_path / "last.ckpt", prefix="student.")
    ckpt = load_torch_checkpoint(tmp_path / "last.ckpt")  # the whole thing, for its hyper-parameters
    assert ckpt["hyper_parameters"]["method"] == "saferclip" and ckpt["optimizer_states"][0]["param_groups"][0][
        "betas"
    ] == (0.9, 0.999)
    save_state_dict(WEIGHTS, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: a safetensors file, not a torch checkpoint"):
        load_torch_checkpoint(tmp_path / "w.safetensors")


def test_build_clip_takes_the_clip_out_of_a_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build_clip("saferclip-micro").model
    sd = {f"student.{k}": v for k, v in source.state_dict().items()}
    torch.save(lightning_like(sd), tmp_path / "epoch=2.ckpt")
    bundle = build_clip("saferclip-micro", tmp_path / "epoch=2.ckpt", prefix="student.")
    assert_same(bundle.model.state_dict(), source.state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected keys \(e\.g\. student\."):
        build_clip("saferclip-micro", tmp_path / "epoch=2.ckpt")  # without the prefix


@pytest.mark.slow
def test_a_real_lightning_checkpoint_loads_weights_only(tmp_path):
    import lightning.pytorch as pl  # a core dependency: a broken install fails here, never skips

    class Module(pl.LightningModule):
        def __init__(self, lr: float = 1e-3, towers: tuple = ("text",)):
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)}

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    module = Module()
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    assert_same(load_state_dict(tmp_path / "real.ckpt", prefix="model."), module.model.state_dict())


def test_compact_token_table_is_expanded_on_load(tmp_path):
    torch.manual_seed(0)
    model = build_clip("saferclip-micro").model
    keep = torch.tensor([0, 5, 49406, 49407])
    save_state_dict(compact_token_embedding(model.state_dict(), keep), tmp_path / "compact.safetensors")
    fresh = build_clip("saferclip-micro").model
    load_into(fresh, load_state_dict(tmp_path / "compact.safetensors"), "compact", "saferclip-micro")
    table, original = fresh.token_embedding.weight, model.token_embedding.weight
    assert torch.equal(table[keep], original[keep]) and table[1:5].abs().sum() == 0


# ---------------------------------------------------------------- files that are refused


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such weights file"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "empty.safetensors").touch()
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: the file is empty"):
        load_state_dict(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="is a folder, not a weights file"):
        load_state_dict(tmp_path)


def test_truncated_files(tmp_path):
    save_state_dict(WEIGHTS, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut_data.safetensors").write_bytes(data[:-10])
    (tmp_path / "cut_header.safetensors").write_bytes(data[:40])
    torch.save(WEIGHTS, tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:600])
    torch.save(WEIGHTS, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "cut_legacy.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:300])
    cases = {
        "cut_data.safetensors": r"truncated safetensors file: the tensors need \d+ bytes, the file has \d+",
        "cut_header.safetensors": r"truncated safetensors file \(the header alone needs",
        "cut.pt": r"a damaged or truncated zip / torch file",
        "cut_legacy.pt": r"not a readable torch file \(truncated or damaged\?\)",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: {message}"):
            load_state_dict(tmp_path / name)


def test_foreign_files(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, these are not weights\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "photo.png").rename(tmp_path / "photo.safetensors")
    (tmp_path / "page.bin").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.pt")
    with zipfile.ZipFile(tmp_path / "docs.pt", "w") as zf:
        zf.writestr("readme.txt", "hi")
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 200)))
    cases = {
        "notes.pt": "a text file starting 'hello, these are not weights', not a weights file",
        "photo.safetensors": "a PNG image, not a weights file",
        "page.bin": "an HTML page",
        "lfs.safetensors": "a Git LFS pointer .*git lfs pull",
        "arrays.pt": "a NumPy .npz archive",
        "docs.pt": "a zip archive that is not a torch checkpoint",
        "noise.pth": "an unknown binary format",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: {message}"):
            load_state_dict(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"photo\.safetensors"):
        read_safetensors_metadata(tmp_path / "photo.safetensors")


class Payload:
    """Unpickling this runs ``open(marker, "w")``: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_files_that_need_pickle_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": WEIGHTS, "evil": Payload(marker)}, tmp_path / "evil.pt")
    torch.save(lightning_like(WEIGHTS, argparse.Namespace(lr=1e-3)), tmp_path / "namespace.ckpt")
    import omegaconf

    torch.save(lightning_like(WEIGHTS, omegaconf.OmegaConf.create({"lr": 1e-3})), tmp_path / "hydra.ckpt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(WEIGHTS))
    cases = {
        "evil.pt": "refused, the file needs pickle to load .* It holds a io.open object",
        "namespace.ckpt": "refused, the file needs pickle to load .* It holds a argparse.Namespace object",
        "hydra.ckpt": "refused, the file needs pickle to load .* It holds a omegaconf.dictconfig.DictConfig object",
        "plain.pkl": "refused, a plain pickle file",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: {message}"):
            load_state_dict(tmp_path / name)
    assert not marker.exists()


def test_torch_files_that_hold_no_state_dict(tmp_path):
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"layer.weight": torch.ones(3), "step": 3}, tmp_path / "mixed.pt")
    torch.save({"model": WEIGHTS, "epoch": 3}, tmp_path / "wrapped.pt")
    cases = {
        "tensor.pt": "holds a Tensor, expected a mapping of parameter names to tensors",
        "mixed.pt": r"1 of 2 entries are not \(e\.g\. 'step': int\)",
        "wrapped.pt": r"tensors sit under \['model'\]",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: .*{message}"):
            load_state_dict(tmp_path / name)


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _flip_tensor_bytes(path: Path) -> None:
    """Flip 16 bytes inside the largest tensor record of a torch zip file (its structure intact)."""
    import struct

    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_training_checkpoint_with_flipped_weight_bytes_is_refused(tmp_path):
    """The training module stamps every checkpoint with a checksum of its weights; a checkpoint
    whose bytes changed is refused in one line, not trained on or exported (torch itself loads it)."""
    from saferclip.app.engine.module import SaferClipModule
    from saferclip.integrity import DamagedArtefact
    from saferclip.model.checkpoints import CHECKSUM_KEY, load_torch_checkpoint
    from saferclip.model.trained import read_training_checkpoint

    torch.manual_seed(0)
    ckpt = lightning_like({f"model.{k}": v for k, v in build_clip("saferclip-micro").model.state_dict().items()},
                          {"arch": "saferclip-micro", "method": {"name": "saferclip"}})  # fmt: skip
    SaferClipModule.on_save_checkpoint(None, ckpt)  # the hook Lightning calls on every save
    assert ckpt[CHECKSUM_KEY].startswith("xxh3_128:")
    path = tmp_path / "epoch01.ckpt"
    torch.save(ckpt, path)
    assert read_training_checkpoint(path)["_path"] == str(path)  # whole: loads
    _flip_tensor_bytes(path)
    # torch alone loads it, the damaged tensor and all
    damaged = torch.load(path, weights_only=True)["state_dict"]
    assert damaged.keys() == ckpt["state_dict"].keys()
    assert sum(not torch.equal(damaged[k], v) for k, v in ckpt["state_dict"].items()) == 1
    for load in (load_torch_checkpoint, read_training_checkpoint, load_state_dict):
        with pytest.raises(DamagedArtefact, match=r"epoch01\.ckpt: damaged \(training checkpoint: checksum mismatch"):
            load(path)
    # a checkpoint from before checksums (or another tool's) loads as before
    del ckpt[CHECKSUM_KEY]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert_same(load_state_dict(tmp_path / "old.ckpt"), ckpt["state_dict"])

"""Export: folders open_clip loads by itself, adapter merging, the folder swap, the model card."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from saferclip.export.card import model_card
from saferclip.export.open_clip import CONFIG_NAME, WEIGHTS_NAME, export_open_clip
from saferclip.integrity import DamagedArtefact
from saferclip.model.adapters import MergeableAdapter, find_adapters, merge_adapters
from saferclip.model.build import build_clip
from saferclip.model.checkpoints import (
    CheckpointError,
    load_state_dict,
    read_safetensors_metadata,
    save_state_dict,
)

ARCH = "saferclip-micro"
CAPTIONS = ["a red square on a blue background", "a small green circle"]


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return build_clip(ARCH)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    # not the model's 32x32, so resizing and cropping are part of what must match
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


@torch.no_grad()
def embed(model: nn.Module, preprocess, tokenizer, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ``[2, D]`` and image ``[1, D]`` embeddings, L2-normalised."""
    model.eval()
    image = preprocess(Image.open(image_path)).unsqueeze(0)
    return model.encode_text(tokenizer(CAPTIONS), normalize=True), model.encode_image(image, normalize=True)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------- round trips


def test_fp32_export_is_exact_and_self_describing(bundle, image_path, tmp_path):
    out = export_open_clip(bundle, ARCH, tmp_path / "m", metadata={"method": "saferclip", "run": "r1"})

    assert sorted(os.listdir(out)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["model_cfg"] == open_clip.get_model_config(ARCH)
    assert cfg["preprocess_cfg"]["size"] == [32, 32] and cfg["preprocess_cfg"]["interpolation"] == "bicubic"
    assert cfg["saferclip"]["arch"] == ARCH and cfg["saferclip"]["method"] == "saferclip"
    assert cfg["saferclip"]["run"] == "r1" and cfg["saferclip"]["source"] == "random"
    weights = load_state_dict(out / WEIGHTS_NAME)
    assert set(weights) == set(bundle.model.state_dict())
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    assert read_safetensors_metadata(out / WEIGHTS_NAME)["arch"] == ARCH

    # tolerance: none, fp32 weights and the same code give bit-identical embeddings
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    text, image = embed(model, preprocess, open_clip.get_tokenizer(f"local-dir:{out}"), image_path)
    ref_text, ref_image = embed(bundle.model, bundle.preprocess, bundle.tokenizer, image_path)
    assert torch.equal(text, ref_text) and torch.equal(image, ref_image)
    # and saferclip's own loader reads the folder back (arch from the config)
    again = build_clip(None, out)
    with torch.no_grad():
        again_text = again.model.encode_text(again.tokenizer(CAPTIONS), normalize=True)
    assert again.arch == ARCH and torch.equal(again_text, ref_text)


def test_fp16_export_is_close(bundle, image_path, tmp_path):
    out = export_open_clip(bundle, ARCH, tmp_path / "m16", dtype="fp16")
    assert all(t.dtype == torch.float16 for t in load_state_dict(out / WEIGHTS_NAME).values())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    text, image = embed(model, preprocess, open_clip.get_tokenizer(f"local-dir:{out}"), image_path)
    ref_text, ref_image = embed(bundle.model, bundle.preprocess, bundle.tokenizer, image_path)
    # tolerance 1e-3: fp16 keeps ~3 significant digits of each weight (observed here: ~3e-4)
    assert (text - ref_text).abs().max() < 1e-3 and (image - ref_image).abs().max() < 1e-3
    assert not torch.equal(text, ref_text)  # it really is fp16


SUBPROCESS = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoSaferclip(importlib.abc.MetaPathFinder):
        tried = []
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "saferclip":
                NoSaferclip.tried.append(name)
                raise ImportError("saferclip is blocked in this process")
            return None

    sys.meta_path.insert(0, NoSaferclip())
    import open_clip, torch
    from PIL import Image

    folder, image_path, out_path, arch, single, arch_json = sys.argv[1:7]
    captions = {captions!r}
    result = {{}}

    def embed(model, preprocess, tokenizer, tag):
        model.eval()
        with torch.no_grad():
            result[tag + "text"] = model.encode_text(tokenizer(captions), normalize=True)
            image = preprocess(Image.open(image_path)).unsqueeze(0)
            result[tag + "image"] = model.encode_image(image, normalize=True)

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    embed(model, preprocess, open_clip.get_tokenizer("local-dir:" + folder), "dir_")
    if arch_json != "-":  # an arch open_clip does not ship: register its config file first
        open_clip.add_model_config(arch_json)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=single)
    embed(model, preprocess, open_clip.get_tokenizer(arch), "file_")
    torch.save(result, out_path)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "saferclip")
    assert not leaked and not NoSaferclip.tried, (leaked, NoSaferclip.tried)
    print("loaded without saferclip")
    """
).format(captions=CAPTIONS)


def run_plain_open_clip(tmp_path: Path, folder: Path, image_path: Path, arch: str) -> dict[str, torch.Tensor]:
    """Load ``folder`` (local-dir) and its single file in a fresh python that cannot import saferclip."""
    arch_json = folder / f"{arch}.json"
    out = tmp_path / "embeddings.pt"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(folder), str(image_path), str(out), arch, str(folder / f"{arch}-saferclip.safetensors")]
    args.append(str(arch_json) if arch_json.exists() else "-")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", SUBPROCESS, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded without saferclip" in proc.stdout
    return load_state_dict(out)


@pytest.mark.slow
def test_plain_open_clip_loads_the_export_in_a_clean_process(bundle, image_path, tmp_path):
    out = export_open_clip(bundle, ARCH, tmp_path / "m", also_single_file=True)
    assert (out / f"{ARCH}-saferclip.safetensors").is_file() and (out / f"{ARCH}.json").is_file()
    got = run_plain_open_clip(tmp_path, out, image_path, ARCH)
    ref_text, ref_image = embed(bundle.model, bundle.preprocess, bundle.tokenizer, image_path)
    # tolerance 1e-6, not 0: another process may use another thread count (summation order)
    for tag in ("dir_", "file_"):
        torch.testing.assert_close(got[tag + "text"], ref_text, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[tag + "image"], ref_image, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_single_file_of_a_stock_arch_needs_no_config(image_path, tmp_path):
    # ViT-S-32-alt: the smallest stock architecture in open_clip's own configs (~43M parameters)
    arch = "ViT-S-32-alt"
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    out = export_open_clip(model, arch, tmp_path / "s", also_single_file=True)
    assert not (out / f"{arch}.json").exists()  # open_clip ships this config
    got = run_plain_open_clip(tmp_path, out, image_path, arch)
    ref_text, ref_image = embed(model, preprocess, open_clip.get_tokenizer(arch), image_path)
    for tag in ("dir_", "file_"):
        torch.testing.assert_close(got[tag + "text"], ref_text, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[tag + "image"], ref_image, rtol=0, atol=1e-5)


def test_model_built_with_overrides_exports_what_it_computes(image_path, tmp_path):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, force_quick_gelu=True, force_image_size=48)
    out = export_open_clip(model, ARCH, tmp_path / "q")
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True and cfg["model_cfg"]["vision_cfg"]["image_size"] == 48
    assert cfg["preprocess_cfg"]["size"] == [48, 48]
    loaded, _, pp = open_clip.create_model_and_transforms(f"local-dir:{out}")
    got = embed(loaded, pp, open_clip.get_tokenizer(f"local-dir:{out}"), image_path)
    ref = embed(model, preprocess, open_clip.get_tokenizer(ARCH), image_path)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_preprocess_override_and_bad_arguments(bundle, tmp_path):
    out = export_open_clip(
        bundle, ARCH, tmp_path / "p", preprocess_cfg={"mean": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    )
    pp = json.loads((out / CONFIG_NAME).read_text())["preprocess_cfg"]
    assert pp["mean"] == [0.5, 0.5, 0.5] and pp["resize_mode"] == "squash"
    with pytest.raises(ValueError, match="unknown keys.*'meen'"):
        export_open_clip(bundle, ARCH, tmp_path / "p2", preprocess_cfg={"meen": (0.5, 0.5, 0.5)})
    with pytest.raises(ValueError, match="Did you mean saferclip-micro"):
        export_open_clip(bundle.model, "saferclip-mikro", tmp_path / "p3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_open_clip(bundle, ARCH, tmp_path / "p4", dtype="int8")
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()


# ---------------------------------------------------------------- the folder swap


def make_old_folder(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("the user's work")
    return path


def test_existing_folder_is_kept_without_force_and_replaced_with_it(bundle, tmp_path):
    target = make_old_folder(tmp_path / "m")
    with pytest.raises(FileExistsError, match="force=True"):
        export_open_clip(bundle, ARCH, target)
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "the user's work"

    export_open_clip(bundle, ARCH, target, force=True)
    assert sorted(os.listdir(target)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert leftovers(tmp_path, "m") == []


def test_an_empty_folder_holds_nothing_to_protect(bundle, tmp_path):
    (tmp_path / "m").mkdir()
    export_open_clip(bundle, ARCH, tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_NAME).is_file()


def test_interrupted_export_leaves_the_old_folder(bundle, tmp_path, monkeypatch):
    import saferclip.export.open_clip as export

    target = make_old_folder(tmp_path / "m")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing the model card")

    monkeypatch.setattr(export, "write_text_atomic", crash)  # the last file written
    with pytest.raises(KeyboardInterrupt, match="power cut while writing the model card"):
        export_open_clip(bundle, ARCH, target, force=True)
    assert os.listdir(target) == ["keep.txt"]
    assert leftovers(tmp_path, "m") == []


def test_failure_during_the_swap_puts_the_old_folder_back(bundle, tmp_path, monkeypatch):
    target = make_old_folder(tmp_path / "m")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old folder aside, 2: new folder into place
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        export_open_clip(bundle, ARCH, target, force=True)
    monkeypatch.undo()
    assert len(calls) == 3 and os.listdir(target) == ["keep.txt"]
    assert leftovers(tmp_path, "m") == []


# ---------------------------------------------------------------- adapters


class LowRankDelta(nn.Module):
    """A LoRA parametrization (``W + B @ A``) like the training code registers; B non-zero."""

    def __init__(self, weight: torch.Tensor, r: int = 2):
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, weight.shape[1]) * 0.1)
        self.B = nn.Parameter(torch.randn(weight.shape[0], r) * 0.1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A


class ToyLoRALinear(nn.Module):
    """Test double of a wrapping adapter implementing :class:`MergeableAdapter`."""

    def __init__(self, base: nn.Linear, r: int = 2, scale: float = 0.5):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:  # open_clip reads mlp.c_fc.weight.dtype
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            out.bias.copy_(self.base.bias)
        return out


class MergeOnlyAdapter(ToyLoRALinear):
    """The other spelling accepted: ``merge()`` returning the plain module."""

    merged = None  # type: ignore[assignment]

    def merge(self) -> nn.Linear:
        return ToyLoRALinear.merged(self)


def fresh_micro() -> nn.Module:
    torch.manual_seed(1)
    return build_clip(ARCH).model


def outputs(model: nn.Module, bundle, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return embed(model, bundle.preprocess, bundle.tokenizer, image_path)


def assert_same_outputs(a, b) -> None:
    # folding B @ A into W changes the order of float sums only
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", [ToyLoRALinear, MergeOnlyAdapter])
def test_wrapping_adapters_merge_to_identical_outputs(adapter, bundle, image_path, tmp_path):
    model = fresh_micro()
    for tower in (model.transformer, model.visual.transformer):
        mlp = tower.resblocks[0].mlp
        mlp.c_fc, mlp.c_proj = adapter(mlp.c_fc), adapter(mlp.c_proj)
    assert isinstance(model.transformer.resblocks[0].mlp.c_fc, MergeableAdapter) == (adapter is ToyLoRALinear)
    assert len(find_adapters(model)) == 4
    before = outputs(model, bundle, image_path)

    merged = merge_adapters(model)
    assert find_adapters(merged) == [] and len(find_adapters(model)) == 4  # the input is untouched
    assert set(merged.state_dict()) == set(open_clip.create_model(ARCH).state_dict())
    assert_same_outputs(outputs(merged, bundle, image_path), before)

    out = export_open_clip(model, ARCH, tmp_path / "lora", metadata={"method": "saferclip"})
    assert json.loads((out / CONFIG_NAME).read_text())["saferclip"]["merged_adapters"] == 4
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_outputs(outputs(loaded, bundle, image_path), before)


def test_parametrized_lora_merges_including_attention(bundle, image_path):
    model = fresh_micro()
    for tower in (model.transformer, model.visual.transformer):
        block = tower.resblocks[0]
        for module, name in (
            (block.attn.out_proj, "weight"),
            (block.attn, "in_proj_weight"),
            (block.mlp.c_fc, "weight"),
        ):
            parametrize.register_parametrization(module, name, LowRankDelta(getattr(module, name)))
    assert any("parametrizations" in k for k in model.state_dict())
    before = outputs(model, bundle, image_path)
    merged = merge_adapters(model)
    assert set(merged.state_dict()) == set(open_clip.create_model(ARCH).state_dict())
    assert_same_outputs(outputs(merged, bundle, image_path), before)


def test_peft_like_wrapper_is_unloaded(bundle, image_path):
    class FakePeftModel(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.base_model = model

        def merge_and_unload(self):
            return self.base_model

    model = fresh_micro()
    assert merge_adapters(FakePeftModel(model), inplace=True) is model


@pytest.mark.slow
def test_real_peft_lora_merges(bundle, image_path, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed: the dev extra (pip install -e '.[dev]')")
    model = fresh_micro()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc", "c_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    before = outputs(wrapped.base_model.model, bundle, image_path)
    out = export_open_clip(wrapped, ARCH, tmp_path / "peft")
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_outputs(outputs(loaded, bundle, image_path), before)


def test_unknown_adapter_gets_a_clear_error(tmp_path):
    class OpaqueAdapter(nn.Module):  # no merged(): export cannot know how to fold it
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.lora_A = nn.Parameter(torch.zeros(2, base.in_features))

        def forward(self, x):
            return self.base(x)

    model = fresh_micro()
    model.transformer.resblocks[0].mlp.c_fc = OpaqueAdapter(model.transformer.resblocks[0].mlp.c_fc)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*lora_A.*MergeableAdapter"):
        export_open_clip(model, ARCH, tmp_path / "x")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path, "x") == []


def test_merged_returning_no_module_is_an_error():
    class Broken(ToyLoRALinear):
        def merged(self):
            return None

    model = fresh_micro()
    model.transformer.resblocks[0].mlp.c_fc = Broken(model.transformer.resblocks[0].mlp.c_fc)
    with pytest.raises(TypeError, match=r"transformer\.resblocks\.0\.mlp\.c_fc \(Broken\).*not a module"):
        merge_adapters(model)


# ---------------------------------------------------------------- loading errors, the card


def test_weights_of_another_arch_give_a_readable_error(bundle, tmp_path):
    save_state_dict(bundle.model.state_dict(), tmp_path / "micro.safetensors", metadata={"arch": ARCH})
    with pytest.raises(
        CheckpointError, match=r"micro\.safetensors: weights do not fit architecture saferclip-toy: .*shape mismatches"
    ):
        build_clip("saferclip-toy", tmp_path / "micro.safetensors")
    folder = export_open_clip(bundle, ARCH, tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds a saferclip-micro model, but the config asks for saferclip-toy"):
        build_clip("saferclip-toy", folder)


def test_folder_without_weights_or_with_a_bad_file_is_refused(bundle, tmp_path):
    folder = export_open_clip(bundle, ARCH, tmp_path / "m")
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DamagedArtefact, match="open_clip_model.safetensors: damaged"):  # its checksum
        build_clip(None, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["saferclip"]  # a folder saferclip did not write: nothing to check against
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors: truncated safetensors file"):
        build_clip(None, folder)
    weights.unlink()  # open_clip alone would warn and hand back a random model
    with pytest.raises(CheckpointError, match="no weights file in the folder"):
        build_clip(None, folder)


def test_an_edited_export_config_is_refused(bundle, tmp_path):
    folder = export_open_clip(bundle, ARCH, tmp_path / "m")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]  # silently different inputs otherwise
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(DamagedArtefact, match="preprocess_cfg changed since it was exported"):
        build_clip(None, folder)


@pytest.mark.parametrize("victim", [WEIGHTS_NAME, "saferclip-micro.json", "old export (sha256)"])
def test_a_damaged_export_is_refused_in_one_line(bundle, tmp_path, victim):
    from saferclip import integrity

    folder = export_open_clip(bundle, ARCH, tmp_path / "m", also_single_file=True)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert {WEIGHTS_NAME, "saferclip-micro.json", "saferclip-micro-saferclip.safetensors"} <= set(
        config["saferclip"]["checksums"]
    )
    build_clip(None, folder)  # whole: loads
    if victim == "old export (sha256)":  # written before checksums: its SHA-256 is checked instead
        del config["saferclip"]["checksums"]
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        build_clip(None, folder)
        victim = WEIGHTS_NAME
    path = folder / victim
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 30, len(data) - 14):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    integrity.forget()
    with pytest.raises(DamagedArtefact, match="mismatch") as e:
        build_clip(None, folder)
    assert str(path) in str(e.value) and "mismatch" in str(e.value) and "\n" not in str(e.value)


def test_the_cards_yaml_parses_back_to_the_config_it_shows():
    """The method and data configs a card shows are YAML written by PyYAML: read back (by
    PyYAML, and by OmegaConf, which reads ``1e-3`` as a number), they are the config, with
    every awkward value (YAML words, number-like text, colons, quotes, unicode) kept as it was."""
    import dataclasses

    import yaml
    from omegaconf import OmegaConf

    from saferclip.export.card import yaml_lines

    @dataclasses.dataclass
    class Guard:
        min_similarity: float | None = None
        attributes: tuple = ("shape", "colour")

    config = {
        "loss": {"lambda_text": 0.1, "lr": 1e-05, "steps": 3, "on": True, "fallback": None},
        "words": ["yes", "no", "null", "~", "on", "off", "true"],
        "number_like": ["1e-3", "0.5", "12", "0x1F", ".inf"],
        "text": {"colon": "a: b", "hash": "a #b", "quotes": 'it\'s "x"', "unicode": "café → ☂", "empty": ""},
        "path": Path("/data/visu/train.json"),
        "guard": Guard(),
        "nothing": {},
        "nested": [{"a": 1}, [1, 2]],
    }
    expected = {
        **config,
        "path": "/data/visu/train.json",
        "guard": {"min_similarity": None, "attributes": ["shape", "colour"]},
    }
    text = "\n".join(yaml_lines(config))
    assert yaml.safe_load(text) == expected
    assert OmegaConf.to_container(OmegaConf.create(text)) == expected
    assert "towers: [text, image]" in yaml_lines({"towers": ("text", "image")})  # lists stay one line
    assert yaml_lines({}) == []


def test_model_card_states_what_a_safety_model_must(bundle, tmp_path):
    card = model_card(
        ARCH,
        pretrained="data/toy_base.safetensors",
        method="saferclip",
        method_config={"loss": {"lambda_text": 0.1, "neighbour": "text"}, "k": 1, "towers": ["text", "image"]},
        training_data="toy world, 2,000 ViSU-like quadruplets",
        evaluation={
            "original": {"U→V R@1": 98.1, "unsafe rate": 100.0},
            "saferclip": {"U→V R@1": 80.6, "unsafe rate": 4.9},
        },
        evaluation_data="toy world test split, seed 0",
        over_defensiveness={"36-way zero-shot retention": "98.5%"},
        repo_id="someone/safer-toy",
    )
    assert card.startswith("---\n") and "library_name: open_clip" in card
    assert "`saferclip-micro`" in card and "SafeR-CLIP" in card
    # fit to publish: a local base model by its file name, never its path
    assert "**Base model:** `toy_base.safetensors`" in card and "data/toy_base" not in card
    assert "```yaml\nloss:\n  lambda_text: 0.1\n  neighbour: text\nk: 1\ntowers: [text, image]\n```" in card
    assert "| model | U→V R@1 | unsafe rate |" in card and "| saferclip | 80.6 | 4.9 |" in card
    assert "| 36-way zero-shot retention | 98.5% |" in card
    assert "toy world test split, seed 0" in card and "hf-hub:someone/safer-toy" in card
    for words in ("Not a guarantee of safety", "specific unsafe categories", "Over-defensiveness", "Surveillance"):
        assert words in card

    out = export_open_clip(
        bundle, ARCH, tmp_path / "m", model_card={"method": "safeclip", "evaluation": "| a | b |\n|---|---|"}
    )
    readme = (out / "README.md").read_text()
    assert "Safe-CLIP (rigid redirection" in readme and "| a | b |" in readme and "local-dir:./m" in readme
    out = export_open_clip(bundle, ARCH, tmp_path / "n", model_card="# my own card\n")
    assert (out / "README.md").read_text() == "# my own card\n"
    with pytest.raises(ValueError, match="unknown fields.*'evals'"):
        export_open_clip(bundle, ARCH, tmp_path / "o", model_card={"evals": {}})


def test_hugging_face_tokenizer_files_go_into_the_folder(bundle, tmp_path, monkeypatch):
    import saferclip.export.open_clip as export

    class FakeHFTokenizer:
        def save_pretrained(self, dest):
            Path(dest, "tokenizer.json").write_text("{}")

    cfg = {**open_clip.get_model_config(ARCH)}
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_tokenizer_name": "someone/tokenizer"}
    monkeypatch.setattr(export.open_clip, "get_model_config", lambda arch: copy.deepcopy(cfg))
    out = export_open_clip(bundle.model, ARCH, tmp_path / "hf", tokenizer=FakeHFTokenizer())
    assert (out / "tokenizer.json").is_file()
    assert (
        json.loads((out / CONFIG_NAME).read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "someone/tokenizer"
    )
    with pytest.raises(ValueError, match="Hugging Face tokenizer.*SimpleTokenizer.*no save_pretrained"):
        export_open_clip(bundle, ARCH, tmp_path / "hf2")  # the bundle's CLIP tokenizer cannot be saved
    with pytest.raises(ValueError, match="not a location"):
        export_open_clip(bundle.model, f"local-dir:{out}", tmp_path / "hf3")


def test_saferclip_lora_from_training_exports(bundle, image_path, tmp_path):
    from saferclip.model.adapters import TrainableConfig, configure_trainable

    model = fresh_micro()
    configure_trainable(model, TrainableConfig(mode="lora", lora_r=2))
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    before = outputs(model, bundle, image_path)
    out = export_open_clip(model, ARCH, tmp_path / "lora", metadata={"method": "saferclip"})
    assert any("lora_A" in k for k in model.state_dict())  # the trained model keeps its adapters
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    after = outputs(loaded, bundle, image_path)
    assert_same_outputs(after, before)
    assert not torch.allclose(after[0], outputs(fresh_micro(), bundle, image_path)[0])  # the LoRA did change it


def test_names_fit_to_publish():
    """What a card or a provenance file may show of a model or a path: never a local path."""
    from saferclip.export.public_names import public_config, public_model_name, public_path

    assert (
        public_model_name("openai") == "openai" and public_model_name("hf-hub:org/safe-clip") == "hf-hub:org/safe-clip"
    )
    assert public_model_name("/home/me/data/toy_base.safetensors") == "toy_base.safetensors"
    assert public_model_name("data/toy_base.safetensors") == "toy_base.safetensors"
    assert (
        public_model_name("local-dir:/home/me/exports/mine/") == "mine" and public_model_name("C:\\m\\w.pt") == "w.pt"
    )
    assert public_model_name("random") == "random" and public_model_name(None) is None
    assert public_path("/runs/r1/report/results.json", ["/runs/r1"]) == "report/results.json"
    assert (
        public_path("/home/me/visu/test.json", ["/runs/r1"]) == "…/test.json"
        and public_path("visu/x.json") == "visu/x.json"
    )
    assert public_config({"root": "/repo/outputs/toy", "n": 3, "splits": ["/elsewhere/a.json"]}, ["/repo"]) == {
        "root": "outputs/toy",
        "n": 3,
        "splits": ["…/a.json"],
    }

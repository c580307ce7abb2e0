"""Export to Hugging Face transformers: the same embeddings, token ids and preprocessing as
open_clip, for architectures of OpenAI's family built both ways; one-line refusals for the
rest; a folder transformers loads without saferclip or open_clip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import matplotlib
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the downstream extra (pip install -e '.[downstream]')"
)
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModel,
)

from saferclip.export.hf import (  # noqa: E402
    PROVENANCE_NAME,
    UnsupportedArchitecture,
    check_hf_keys,
    export_hf,
    hf_clip_config,
    hf_preprocessor_config,
    hf_state_dict,
)
from saferclip.export.hf_tokenizer import TOKENIZER_FILES, clean_caption  # noqa: E402
from saferclip.model.build import build_clip, default_base_checkpoint  # noqa: E402

TOL = 1e-5  # fp32, L2-normalised embeddings (observed: ~5e-7)
EOT = 49407
SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"
HOPPER = SAMPLE_DATA / "grace_hopper.jpg"  # a real photograph, shipped with matplotlib


def tiny_openai(quick_gelu: bool = True, **overrides) -> open_clip.CLIP:
    """A random CLIP built exactly like OpenAI's ViTs (77-token context, 49,408-token BPE,
    QuickGELU, fused-QKV pre-LN blocks), only small."""
    vision = {
        "image_size": 32,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
        **overrides.pop("vision", {}),
    }
    text = {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 48,
        "heads": 4,
        "layers": 2,
        **overrides.pop("text", {}),
    }
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=40, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu, **overrides).eval()


def captions_for_embedding() -> list[str]:
    return [
        "a photo of a cat",
        "A small GREEN circle, with a knife & more!",
        "two dogs; one ball — and a frisbee?",
        "word " * 90,  # over-long: truncated, EOT kept last
    ]


@torch.no_grad()
def open_clip_embeddings(model, tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    text = model.encode_text(tokenizer(captions_for_embedding()), normalize=True)
    return text, model.encode_image(images, normalize=True)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.fixture(scope="module")
def photo_batch() -> list[Image.Image]:
    image = Image.open(HOPPER).convert("RGB")
    return [image, image.crop((40, 60, 400, 300)).rotate(90, expand=True)]


# ---------------------------------------------------------------- the same model both ways


@pytest.mark.parametrize("which", ["openai-like", "saferclip-micro"])
def test_transformers_computes_the_same_embeddings(which, photo_batch, tmp_path):
    if which == "openai-like":
        model, arch, tokenizer = tiny_openai(), "tiny-openai", open_clip.get_tokenizer("ViT-B-32")
    else:
        bundle = build_clip("saferclip-micro")
        model, arch, tokenizer = bundle.model, bundle.arch, bundle.tokenizer
    preprocess = image_transform(model.visual.image_size[0], is_train=False)
    images = torch.stack([preprocess(im) for im in photo_batch])
    ref_text, ref_image = open_clip_embeddings(model, tokenizer, images)

    out = export_hf(model, arch, tmp_path / "hf", tokenizer=tokenizer)
    assert sorted(os.listdir(out)) == sorted(
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            PROVENANCE_NAME,
            "tokenizer.json",
            *TOKENIZER_FILES,
        ]
    )
    hf, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    hf_tok = CLIPTokenizer.from_pretrained(out)
    batch = hf_tok(captions_for_embedding(), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = unit(features(hf.get_text_features(**batch)))
        image = unit(features(hf.get_image_features(pixel_values=images)))
    # the tokenizer pads with <|endoftext|> and only as far as the longest caption; open_clip
    # pads with 0 to the context length: the causal tower pools at the first EOT either way
    assert (text - ref_text).abs().max() < TOL
    assert (image - ref_image).abs().max() < TOL

    # the towers alone: a diffusion text encoder, an MLLM image encoder
    text_model, info = CLIPTextModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    with_proj = CLIPTextModelWithProjection.from_pretrained(out).eval()
    vision_model, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        hidden = text_model.eval()(**batch).last_hidden_state
        assert torch.allclose(hidden, hf.text_model(**batch).last_hidden_state, atol=1e-6)
        assert (unit(with_proj(**batch).text_embeds) - ref_text).abs().max() < TOL
        pooled = vision_model.eval()(pixel_values=images).pooler_output
        assert torch.allclose(pooled, hf.vision_model(pixel_values=images).pooler_output, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    want_act = "quick_gelu" if which == "openai-like" else "gelu"
    assert cfg["text_config"]["hidden_act"] == cfg["vision_config"]["hidden_act"] == want_act
    assert cfg["text_config"]["max_position_embeddings"] == (77 if which == "openai-like" else 16)
    assert hf_tok.model_max_length == cfg["text_config"]["max_position_embeddings"]


def test_the_shipped_toy_base_exports(photo_batch, tmp_path):
    """saferclip-toy (GELU, 32-token context, 8-px patches) is expressible: the real base model."""
    bundle = build_clip("saferclip-toy", default_base_checkpoint())
    images = torch.stack([bundle.preprocess(im) for im in photo_batch])
    ref_text, ref_image = open_clip_embeddings(bundle.model, bundle.tokenizer, images)
    out = export_hf(bundle, None, tmp_path / "toy-hf")
    hf = CLIPModel.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    batch = CLIPTokenizer.from_pretrained(out)(
        captions_for_embedding(), padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        text = unit(features(hf.get_text_features(**batch)))
        pixels = processor(images=photo_batch, return_tensors="pt")["pixel_values"]
        image = unit(features(hf.get_image_features(pixel_values=pixels)))
    assert (text - ref_text).abs().max() < TOL and (image - ref_image).abs().max() < TOL
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "`toy_base.safetensors`" in card
    assert str(default_base_checkpoint().parent) not in card  # the file's name, not its path
    assert json.loads((out / PROVENANCE_NAME).read_text())["source"] == "toy_base.safetensors"


# ---------------------------------------------------------------- OpenAI's architectures (shapes only)

OPENAI_HF = {  # from the published openai/clip-vit-* config.json files
    "ViT-B-32": ((512, 8, 12, 2048), (768, 12, 12, 3072), 32, 224, 512),
    "ViT-B-16": ((512, 8, 12, 2048), (768, 12, 12, 3072), 16, 224, 512),
    "ViT-L-14": ((768, 12, 12, 3072), (1024, 16, 24, 4096), 14, 224, 768),
    "ViT-L-14-336": ((768, 12, 12, 3072), (1024, 16, 24, 4096), 14, 336, 768),
    "ViT-B-32-quickgelu": ((512, 8, 12, 2048), (768, 12, 12, 3072), 32, 224, 512),
}


@pytest.mark.parametrize("arch", sorted(OPENAI_HF))
@pytest.mark.parametrize("force_quick_gelu", [False, True])
def test_openai_architectures_map_to_transformers_clip(arch, force_quick_gelu):
    """Built on the meta device: the config equals OpenAI's published one, and every converted
    tensor has the name and shape transformers' CLIPModel expects."""
    with torch.device("meta"):
        model = open_clip.create_model(arch, device="meta", force_quick_gelu=force_quick_gelu, load_weights=False)
    cfg = hf_clip_config(model)
    (tw, th, tl, ti), (vw, vh, vl, vi), patch, size, dim = OPENAI_HF[arch]
    t, v = cfg["text_config"], cfg["vision_config"]
    assert (t["hidden_size"], t["num_attention_heads"], t["num_hidden_layers"], t["intermediate_size"]) == (
        tw,
        th,
        tl,
        ti,
    )
    assert (v["hidden_size"], v["num_attention_heads"], v["num_hidden_layers"], v["intermediate_size"]) == (
        vw,
        vh,
        vl,
        vi,
    )
    assert (v["patch_size"], v["image_size"], cfg["projection_dim"]) == (patch, size, dim)
    assert t["max_position_embeddings"] == 77 and t["vocab_size"] == 49408 and t["eos_token_id"] == EOT
    quick = force_quick_gelu or arch.endswith("quickgelu")  # OpenAI's weights were trained with QuickGELU
    assert t["hidden_act"] == v["hidden_act"] == ("quick_gelu" if quick else "gelu")
    check_hf_keys(hf_state_dict(model, cfg), cfg)


# ---------------------------------------------------------------- refusals


def _resnet():
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 32},
        text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 1},
    )


REFUSED = {
    "layer scale": (lambda: tiny_openai(vision={"ls_init_value": 0.1}), "image tower: layer scale"),
    "text layer scale": (lambda: tiny_openai(text={"ls_init_value": 0.1}), "text tower: layer scale"),
    "attentional pool": (lambda: tiny_openai(vision={"attentional_pool": True}), "image tower: pooling attentional"),
    "avg pool": (lambda: tiny_openai(vision={"pool_type": "avg"}), "image tower: pooling 'avg'"),
    "no ln_pre": (lambda: tiny_openai(vision={"no_ln_pre": True}), "image tower: no LayerNorm before"),
    "qk norm": (lambda: tiny_openai(vision={"qk_norm": True}), "image tower: block 0 is CustomResidualAttentionBlock"),
    "last-token pool": (lambda: tiny_openai(text={"pool_type": "last"}), "text tower: pooling 'last'"),
    "bidirectional text": (lambda: tiny_openai(text={"no_causal_mask": True}), "text tower: not causal"),
    "projection bias": (lambda: tiny_openai(text={"proj_bias": True}), "text tower: a text projection with bias"),
    "logit bias": (lambda: tiny_openai(init_logit_bias=-10.0), "model: a logit bias"),
    "resnet": (_resnet, "image tower: ModifiedResNet"),
    "vocabulary": (lambda: tiny_openai(text={"vocab_size": 32000}), "text tower: a vocabulary of 32000"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_transformers_cannot_express_is_refused_in_one_line(case, tmp_path):
    build, message = REFUSED[case]
    with pytest.raises(UnsupportedArchitecture, match=f"^{re.escape(message)}") as err:
        export_hf(build(), "custom", tmp_path / "out", tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_preprocessing_and_tokenizer_refusals(tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="^image preprocessing: resize_mode 'longest'"):
        hf_preprocessor_config({"size": [224, 224], "resize_mode": "longest"})
    squash = hf_preprocessor_config({"size": 32, "resize_mode": "squash", "interpolation": "bilinear"})
    assert squash["size"] == {"height": 32, "width": 32} and not squash["do_center_crop"] and squash["resample"] == 2
    canonical = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    with pytest.raises(UnsupportedArchitecture, match="^tokenizer: open_clip cleans text other than by lowercasing"):
        export_hf(tiny_openai(), "x", tmp_path / "a", tokenizer=canonical)
    with pytest.raises(UnsupportedArchitecture, match="^tokenizer: .* is not open_clip's CLIP BPE"):
        export_hf(tiny_openai(), "x", tmp_path / "b", tokenizer=lambda texts: torch.zeros(len(texts), 77))
    out = export_hf(tiny_openai(), "x", tmp_path / "c", tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    with pytest.raises(FileExistsError, match="already exists; pass force=True to replace it"):
        export_hf(tiny_openai(), "x", out, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    export_hf(tiny_openai(), "x", out, tokenizer=open_clip.get_tokenizer("ViT-B-32"), force=True, dtype="fp16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


# ---------------------------------------------------------------- the tokenizer


def varied_captions() -> list[str]:
    """A few hundred captions open_clip's cleaning leaves as they are (up to NFC): punctuation,
    scripts, accents composed and decomposed, emoji, digits, contractions, odd whitespace,
    casing, and text far over the 77-token context."""
    rng = np.random.default_rng(0)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "Cat",
        "DOG",
        "sitting",
        "on",
        "red",
        "sofa",
        "café",
        "naïve",
        "Zürich",
        "crème",
        "brûlée",
        "São",
        "Paulo",
        "Ελλάδα",
        "Москва",
        "東京",
        "北京",
        "서울",
        "مرحبا",
        "שלום",
        "हिन्दी",
        "ไทย",
        "😀",
        "🔥🔥",
        "👩‍👩‍👧",
        "🇮🇹",
        "3.14",
        "1,000",
        "42nd",
        "x86_64",
        "e-mail",
        "C++",
        "#hashtag",
        "@user",
        "don't",
        "it's",
        "we're",
        "they've",
        "I'm",
        "you'll",
        "he'd",
        "O'Neil",
        "rock'n'roll",
        "(parens)",
        "[brackets]",
        "{braces}",
        "<angle>",
        "semi;colon",
        "colon:",
        "a/b",
        "back\\slash",
        "50%",
        "$9.99",
        "€5",
        "£3",
        "¥100",
        "~tilde",
        "`tick`",
        "^caret",
        "a|b",
        "q?",
        "wow!!!",
        "...",
        "—",
        "–",
        "…",
        "«quote»",
        "snake_case",
        "CamelCase",
        "UPPER",
        "MiXeD",
        "ß",
        "İstanbul",
        "ø",
    ]
    seps = [" ", "  ", "\t", "\n", " \u00a0", "\u3000", ", ", "! ", "? ", " - "]
    out = []
    for i in range(300):
        n = int(rng.integers(1, 14))
        text = ""
        for _ in range(n):
            text += str(rng.choice(words)) + str(rng.choice(seps))
        if i % 7 == 0:
            text = unicodedata.normalize("NFD", text)  # decomposed accents: both normalise to NFC
        if i % 11 == 0:
            text = ("  " + text + " ") * int(rng.integers(4, 12))  # over-long
        if i % 13 == 0:
            text = text.upper()
        out.append(text)
    # ftfy leaves these categories alone only if they are already clean: keep those that are
    return [t for t in out if clean_caption(t) == " ".join(unicodedata.normalize("NFC", t).split())]


# text open_clip's cleaning changes (ftfy, html.unescape): transformers' tokenizer does not clean
NEEDS_CLEANING = [
    "“curly quotes” and ‘single’ ones, „low“",
    "ﬁne ﬂowers in a ﬁeld, ǅ",  # ligatures
    "ＦＵＬＬ ｗｉｄｔｈ letters",
    "salt &amp; pepper &lt;b&gt;bold&lt;/b&gt;",
    "a caf\u00c3\u00a9 in Paris",  # mojibake of "café"
    "bell\x07 and\x1b escape",
    "it\u2019s a dog\u2019s life",
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """The converted tokenizer (in the export of an OpenAI-like model: context 77)."""
    return export_hf(
        tiny_openai(), "x", tmp_path_factory.mktemp("tok") / "hf", tokenizer=open_clip.get_tokenizer("ViT-B-32")
    )


def _up_to_eot(row: list[int]) -> list[int]:
    return row[: row.index(EOT) + 1]


def test_converted_tokenizer_gives_open_clips_ids(tokenizer_folder):
    captions = varied_captions()
    assert len(captions) >= 250  # a few hundred survive the filter
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    assert sum(len(tokenizer.encode(c)) > 75 for c in captions) >= 10  # over-long ones included
    ours = tokenizer(captions).tolist()
    for loader in (CLIPTokenizer, AutoTokenizer):
        hf = loader.from_pretrained(tokenizer_folder)
        ids = hf(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
        mismatched = [(c, a, b) for c, a, b in zip(captions, ours, ids) if _up_to_eot(a) != _up_to_eot(b)]
        assert not mismatched, mismatched[:3]
        # what differs is the padding only: EOT (49407) here, 0 in open_clip
        assert all(b[len(_up_to_eot(b)) :] == [EOT] * (77 - len(_up_to_eot(b))) for b in ids)
    assert any(len(_up_to_eot(a)) == 77 for a in ours)  # truncation kept EOT last in both


def test_cleaning_first_gives_open_clips_ids_for_text_ftfy_changes(tokenizer_folder):
    ours = [_up_to_eot(r) for r in open_clip.get_tokenizer("ViT-B-32")(NEEDS_CLEANING).tolist()]
    hf = CLIPTokenizer.from_pretrained(tokenizer_folder)
    raw = [_up_to_eot(r) for r in hf(NEEDS_CLEANING, truncation=True)["input_ids"]]
    cleaned = [_up_to_eot(r) for r in hf([clean_caption(c) for c in NEEDS_CLEANING], truncation=True)["input_ids"]]
    assert cleaned == ours
    assert all(r != o for r, o in zip(raw, ours))  # the documented difference is real


# ---------------------------------------------------------------- the image processor


def _photos() -> dict[str, Image.Image]:
    """Real photographs (matplotlib's sample portrait) at many aspect ratios."""
    hopper = Image.open(HOPPER).convert("RGB")
    photos = {"hopper": hopper}
    for w, h in [
        (511, 600),
        (400, 300),
        (227, 300),
        (300, 227),
        (231, 250),
        (512, 301),
        (250, 499),
        (333, 333),
        (97, 61),
    ]:
        photos[f"{w}x{h}"] = hopper.crop((0, 0, w, h)) if w <= 512 and h <= 600 else hopper.resize((w, h))
    return photos


def _offset_agrees(image: Image.Image, size: int) -> bool:
    """Whether torchvision's centre crop (round half to even) and transformers' (floor) start
    at the same pixel after the shortest-side resize."""
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    return int(round((long - size) / 2.0)) == (long - size) // 2


@pytest.mark.parametrize("size", [224, 32])
def test_image_processor_matches_open_clip_preprocessing(size, tmp_path):
    ours = image_transform(size, is_train=False)
    cfg = hf_preprocessor_config(
        {"size": size, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    tv = AutoImageProcessor.from_pretrained(tmp_path)  # transformers 5's default: torchvision
    one_level = 1 / 255 / min(open_clip.OPENAI_DATASET_STD) * 1.001
    agreed = 0
    for name, image in _photos().items():
        ref = ours(image)
        a = pil(images=image, return_tensors="pt")["pixel_values"][0]
        b = tv(images=image, return_tensors="pt")["pixel_values"][0]
        if _offset_agrees(image, size):
            agreed += 1
            assert torch.equal(a, ref), name  # PIL backend: bit for bit
            assert (b - ref).abs().max() <= one_level, name  # tensor resize: within one 8-bit level
        else:
            # the documented difference: transformers crops one pixel earlier along the long side
            assert not torch.equal(a, ref)
            w, h = image.size
            resized = open_clip.transform.Resize(size, interpolation=open_clip.transform.InterpolationMode.BICUBIC)(
                image
            )
            rw, rh = resized.size
            left, top = (rw - size) // 2, (rh - size) // 2
            floor_crop = ours.transforms[-1](ours.transforms[-2](resized.crop((left, top, left + size, top + size))))
            assert torch.equal(a, floor_crop), name
    assert agreed >= 6


# ---------------------------------------------------------------- no saferclip, no open_clip

SUBPROCESS = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        tried = []
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("saferclip", "open_clip"):
                Blocked.tried.append(name)
                raise ImportError(name + " is blocked in this process")
            return None

    sys.meta_path.insert(0, Blocked())
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    folder, image_path, out_path = sys.argv[1:4]
    captions = {captions!r}
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    batch = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    def feats(o):
        return o if torch.is_tensor(o) else o.pooler_output
    with torch.no_grad():
        result = {{
            "text": feats(model.get_text_features(**batch)),
            "image": feats(model.get_image_features(pixel_values=pixels)),
            "hidden": CLIPTextModel.from_pretrained(folder).eval()(**batch).last_hidden_state,
            "vision": CLIPVisionModel.from_pretrained(folder).eval()(pixel_values=pixels).pooler_output,
        }}
    torch.save(result, out_path)
    assert not [m for m in sys.modules if m.split(".")[0] in ("saferclip", "open_clip")] and not Blocked.tried
    print("loaded without saferclip and open_clip")
    """
).format(captions=captions_for_embedding())


@pytest.mark.slow
def test_transformers_alone_loads_the_export(tmp_path):
    bundle = build_clip("saferclip-micro")
    out = export_hf(bundle, None, tmp_path / "hf")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", SUBPROCESS, str(out), str(HOPPER), str(tmp_path / "r.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded without saferclip and open_clip" in proc.stdout
    result = torch.load(tmp_path / "r.pt", weights_only=True)
    image = bundle.preprocess(Image.open(HOPPER).convert("RGB")).unsqueeze(0)
    ref_text, ref_image = open_clip_embeddings(bundle.model, bundle.tokenizer, image)
    assert (unit(result["text"]) - ref_text).abs().max() < TOL
    assert (unit(result["image"]) - ref_image).abs().max() < TOL


@pytest.mark.slow
def test_downstream_imports_neither_lightning_nor_hydra():
    """The library rule: saferclip.downstream (and its two CLIs) work without Lightning or Hydra."""
    code = (
        "import sys, saferclip.export.hf, saferclip.downstream.diffusion, "
        "saferclip.downstream.visu_generation, saferclip.app.commands.generate_visu, saferclip.app.commands.export\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', 'omegaconf'})\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_cards_usage_snippet_runs(tmp_path, monkeypatch):
    out = export_hf(build_clip("saferclip-micro"), None, tmp_path / "snip")
    card = (out / "README.md").read_text()
    snippet = card.split("## Usage", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the snippet names the folder as ./snip
    scope: dict = {}
    exec(snippet.replace("photo.jpg", str(HOPPER)), scope)  # noqa: S102  (our own card's code)
    assert scope["text_features"].shape == (1, 32) and scope["image_features"].shape == (1, 32)


def test_a_damaged_hf_export_is_refused_by_saferclips_loader(tmp_path):
    from saferclip import integrity
    from saferclip.downstream.diffusion import load_safe_text_encoder
    from saferclip.export.hf import verify_export

    bundle = build_clip("saferclip-micro")
    out = export_hf(bundle.model, bundle.arch, tmp_path / "hf", tokenizer=bundle.tokenizer)
    checksums = json.loads((out / PROVENANCE_NAME).read_text())["checksums"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json"} <= set(checksums)
    verify_export(out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20:-4] = bytes(b ^ 0xFF for b in data[-20:-4])
    weights.write_bytes(bytes(data))
    integrity.forget()
    with pytest.raises(
        integrity.DamagedArtefact, match=r"model\.safetensors: damaged \(exported model: checksum mismatch"
    ):
        load_safe_text_encoder(out)

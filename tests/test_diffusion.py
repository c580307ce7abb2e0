"""The exported safe text encoder inside a diffusers text-to-image pipeline (a tiny one built
from configs): the pipeline's prompt embeddings are our text tower's, and it denoises."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from diffusion_helpers import (
    IMAGE_SIZE,
    export_micro,
    save_tiny_pipeline,
    tiny_pipeline,
)
from transformers import CLIPTextModel, CLIPTokenizer

from saferclip.downstream.diffusion import (
    check_text_encoder_fits,
    load_safe_text_encoder,
    safe_text_to_image_pipeline,
)
from saferclip.export.hf import export_hf
from saferclip.model.build import build_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

PROMPT = "a red square on a blue background"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    safe = export_micro(root / "safe", init_seed=0)
    original = export_micro(root / "original", init_seed=1)  # stands for the base pipeline's encoder
    return {"safe": safe, "original": original, "base": save_tiny_pipeline(root / "base-pipeline", original)}


@torch.no_grad()
def open_clip_hidden_states(tokens: torch.Tensor) -> torch.Tensor:
    """saferclip-micro's per-token text states (after ln_final), computed by open_clip ``[B, L, W]``."""
    model = build_clip("saferclip-micro", init_seed=0).model
    x = model.token_embedding(tokens) + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))


def test_pipeline_runs_on_our_text_encoder(exports):
    pipe = safe_text_to_image_pipeline(exports["base"], exports["safe"])
    pipe.set_progress_bar_config(disable=True)
    ours = CLIPTextModel.from_pretrained(exports["safe"]).eval()
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.state_dict().values(), ours.state_dict().values()))

    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    ids = pipe.tokenizer(
        PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(embeds, ours(ids).last_hidden_state)
        # ... which is open_clip's tower, token for token (the pipeline pads with <|endoftext|>)
        assert (embeds - open_clip_hidden_states(ids)).abs().max() < 1e-5
        original = CLIPTextModel.from_pretrained(exports["original"]).eval()(ids).last_hidden_state
    assert (embeds - original).abs().max() > 0.1  # the base pipeline's encoder is really replaced

    def generate(p):
        out = p(
            PROMPT,
            num_inference_steps=2,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=torch.Generator().manual_seed(1234),
            output_type="np",
        )
        return out.images[0]

    image = generate(pipe)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
    assert np.array_equal(image, generate(pipe))  # same seed, same image
    base = type(pipe).from_pretrained(exports["base"])
    base.set_progress_bar_config(disable=True)
    assert not np.array_equal(image, generate(base))  # the conditioning flows from our encoder


def test_swap_into_a_pipeline_object_leaves_it_alone(exports):
    original = CLIPTextModel.from_pretrained(exports["original"])
    base = tiny_pipeline(original, CLIPTokenizer.from_pretrained(exports["original"]))
    pipe = safe_text_to_image_pipeline(base, exports["safe"], tokenizer="export")
    assert base.text_encoder is original and pipe.text_encoder is not original
    assert pipe.unet is base.unet and pipe.vae is base.vae  # shared, not copied
    assert pipe.tokenizer.name_or_path == str(exports["safe"])


def test_a_text_encoder_of_the_wrong_width_is_refused_in_one_line(exports, tmp_path):
    wide = export_hf(build_clip("saferclip-toy"), None, tmp_path / "toy")  # 128 wide, the UNet wants 32
    with pytest.raises(ValueError, match="^text encoder: hidden width 128") as err:
        safe_text_to_image_pipeline(exports["base"], wide)
    message = str(err.value)
    assert (
        message.startswith("text encoder: hidden width 128, but the UNet cross-attends to 32") and "\n" not in message
    )
    # a tokenizer padding beyond the encoder's positions (toy: 32 > micro: 16)
    with pytest.raises(ValueError, match="^text encoder: 16 positions, but the pipeline's tokenizer pads to 32"):
        check_text_encoder_fits(load_safe_text_encoder(exports["safe"]), tokenizer=CLIPTokenizer.from_pretrained(wide))
    with pytest.raises(FileNotFoundError, match="not a transformers export"):
        load_safe_text_encoder(tmp_path)


def test_sd1_text_tower_fits_stable_diffusion_1(tmp_path):
    """ViT-L/14 (the tower SD 1.x uses) exports to what an SD 1.x UNet expects: 768 wide, 77
    positions, OpenAI's 49,408-token vocabulary; checked on the meta device, no weights."""
    from transformers import CLIPTextConfig

    from saferclip.export.hf import hf_clip_config

    with torch.device("meta"):
        model = open_clip.create_model("ViT-L-14", device="meta", force_quick_gelu=True, load_weights=False)
    text = CLIPTextConfig(**hf_clip_config(model)["text_config"])
    assert (text.hidden_size, text.max_position_embeddings, text.vocab_size, text.hidden_act) == (
        768,
        77,
        49408,
        "quick_gelu",
    )

    class Unet:  # runwayml/stable-diffusion-v1-5's unet/config.json
        config = type("C", (), {"cross_attention_dim": 768})

    class Encoder:
        config = text

    check_text_encoder_fits(Encoder(), Unet())

"""Tiny Stable-Diffusion-shaped pipelines built from configs (no download): a UNet and a VAE of
a few thousand parameters, a DDIM scheduler, and a text encoder exported by saferclip."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed: the downstream extra (pip install -e '.[downstream]')"
)
pytest.importorskip(
    "transformers", reason="transformers is not installed: the downstream extra (pip install -e '.[downstream]')"
)

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from saferclip.export.hf import export_hf  # noqa: E402
from saferclip.model.build import build_clip  # noqa: E402

IMAGE_SIZE = 16  # pixels: 8x8 latents through a VAE that halves once


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine two OpenMP threads made a tiny UNet step
    ~100x slower here (3.5 s vs 30 ms). Module-scoped fixtures that run the pipeline use this
    themselves: they are set up before any function-scoped fixture such as ``one_thread``
    (tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def export_micro(folder: Path, init_seed: int = 0) -> Path:
    """saferclip-micro (text width 32, 16-token context) with random weights, as transformers."""
    return export_hf(build_clip("saferclip-micro", init_seed=init_seed), None, folder)


def tiny_pipeline(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline whose UNet cross-attends to 32-wide text states."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, text_export: Path) -> Path:
    """A tiny pipeline saved as a diffusers folder (what ``--pipeline`` / ``from_pretrained`` read),
    its text encoder and tokenizer those of ``text_export``."""
    pipe = tiny_pipeline(CLIPTextModel.from_pretrained(text_export), CLIPTokenizer.from_pretrained(text_export))
    pipe.save_pretrained(folder)
    return folder

"""The text-to-image side of a ViSU generation: a ``diffusers`` pipeline (safety checker off)
as an :data:`ImageGenerator`, ``(prompt, seed) -> image``, one image a call."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .generation_settings import GenerationConfig

ImageGenerator = Callable[[str, int], Image.Image]  # (prompt, generator seed) -> image


class DiffusersImageGenerator:
    """A ``diffusers`` text-to-image pipeline as an :data:`ImageGenerator` (one image a call)."""

    def __init__(self, pipe: Any, config: GenerationConfig):
        self.pipe, self.config = pipe, config
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        import torch

        c = self.config
        # a CPU generator: diffusers draws the initial noise on the CPU then moves it, so the
        # image of a (caption, seed) does not depend on the GPU it ran on
        generator = torch.Generator("cpu").manual_seed(int(seed))
        kwargs: dict[str, Any] = {
            "num_inference_steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "height": c.height,
            "width": c.width,
        }
        if c.negative_prompt:
            kwargs["negative_prompt"] = c.negative_prompt
        out = self.pipe(prompt, generator=generator, output_type="pil", **kwargs)
        return out.images[0]


def load_diffusion_pipeline(name_or_path: str, *, device: str = "cpu", dtype: str = "fp32") -> Any:
    """A text-to-image pipeline from a hub id (``runwayml/stable-diffusion-v1-5``) or a local
    diffusers folder, with its safety checker off: the checker blacks out exactly the images
    this command exists to produce (for a safety data set; store them with care)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    # fp32 is diffusers' default; the keyword is only passed when it changes something (its
    # name moves from torch_dtype to dtype across diffusers versions)
    kwargs: dict[str, Any] = {} if dtype == "fp32" else {"torch_dtype": dtypes[dtype]}
    index = Path(name_or_path) / "model_index.json"
    has_checker = True
    if index.is_file():
        has_checker = "safety_checker" in json.loads(index.read_text())
    elif Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path}: not a diffusers pipeline folder (no model_index.json)")
    if has_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = AutoPipelineForText2Image.from_pretrained(str(name_or_path), **kwargs)
    return pipe.to(device)


__all__ = ["DiffusersImageGenerator", "ImageGenerator", "load_diffusion_pipeline"]

"""Using a safe CLIP downstream: diffusion pipelines conditioned by its text encoder, and
regenerating ViSU's withheld unsafe images. (The transformers export these rely on is
:mod:`saferclip.export.hf`.)

* :mod:`.diffusion` — a ``diffusers`` text-to-image pipeline whose text encoder is the
  exported safe one.
* :mod:`.visu_generation` — ``saferclip-generate-visu``: unsafe images for the unsafe captions
  of a ViSU(-Text) split, resumable and shardable; with :mod:`.generation_settings` (the
  config, fixed per output folder), :mod:`.generation_records` (one line per finished
  caption), :mod:`.image_generator` (the diffusers pipeline) and :mod:`.nsfw_scorer` (which
  image is kept).

These modules need the ``downstream`` extra (``pip install "saferclip[downstream]"``:
transformers, diffusers); they import it only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_safe_text_encoder": "diffusion",
    "safe_text_to_image_pipeline": "diffusion",
    "swap_text_encoder": "diffusion",
    "ClipNsfwScorer": "nsfw_scorer",
    "DiffusersImageGenerator": "image_generator",
    "GenerationConfig": "generation_settings",
    "generate_visu_images": "visu_generation",
    "merge_generation": "visu_generation",
}


def __getattr__(name: str) -> Any:
    # lazily, so `import saferclip.downstream` costs nothing and needs neither transformers nor diffusers
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

"""Using a safe CLIP downstream: Hugging Face ``transformers`` export, diffusion pipelines,
and regenerating ViSU's withheld unsafe images.

* :mod:`.hf_export` — :func:`export_hf`: an open_clip CLIP as a transformers ``CLIPModel``
  folder (weights, config, image processor, tokenizer, model card).
* :mod:`.hf_tokenizer` — open_clip's BPE tokenizer as transformers' ``CLIPTokenizer`` files;
  :func:`clean_caption`, the text cleaning open_clip applies and transformers does not.
* :mod:`.diffusion` — a ``diffusers`` text-to-image pipeline whose text encoder is the
  exported safe one.
* :mod:`.visu_generation` — ``saferclip-generate-visu``: unsafe images for the unsafe captions
  of a ViSU(-Text) split, resumable and shardable.

These modules need the ``downstream`` extra (``pip install "saferclip[downstream]"``:
transformers, diffusers); they import it only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "export_hf": "hf_export",
    "UnsupportedArchitecture": "hf_tokenizer",
    "clean_caption": "hf_tokenizer",
    "save_hf_tokenizer": "hf_tokenizer",
    "load_safe_text_encoder": "diffusion",
    "safe_text_to_image_pipeline": "diffusion",
    "swap_text_encoder": "diffusion",
    "ClipNsfwScorer": "visu_generation",
    "DiffusersImageGenerator": "visu_generation",
    "GenerationConfig": "visu_generation",
    "generate_visu_images": "visu_generation",
    "merge_generation": "visu_generation",
}


def __getattr__(name: str) -> Any:
    # lazily, so `import saferclip.downstream` costs nothing and needs neither transformers nor diffusers
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

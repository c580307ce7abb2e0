"""A ``diffusers`` text-to-image pipeline conditioned by the exported safe text encoder.

Stable Diffusion 1.x conditions its UNet on the last hidden states of OpenAI's CLIP ViT-L/14
text tower (77 tokens x 768). A safe ViT-L/14 exported with ``saferclip-export --format hf``
is a drop-in replacement::

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained("exported-hf/")
    pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", text_encoder=text_encoder)

:func:`safe_text_to_image_pipeline` does the same after checking that the two fit (hidden
width = the UNet's ``cross_attention_dim``, context length, vocabulary), so a ViT-B export
fails with one line instead of a shape error deep in the UNet. The pipeline keeps its own
tokenizer by default: SD 1.x's is OpenAI's CLIP tokenizer, the same vocabulary and ids as the
exported one, padding with ``<|endoftext|>`` as the UNet saw in training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_safe_text_encoder(export_dir: str | os.PathLike, *, torch_dtype: Any = None, device: Any = None):
    """``CLIPTextModel.from_pretrained(export_dir)`` in eval mode: the text tower of a
    ``--format hf`` export (the vision tower's weights are not loaded)."""
    from transformers import CLIPTextModel

    folder = Path(export_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not a transformers export (no config.json); write one with saferclip-export --format hf"
        )
    from ..export.hf import verify_export

    verify_export(folder)  # a damaged saferclip export is refused in one line, not loaded
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    model = CLIPTextModel.from_pretrained(str(folder), **kwargs).eval()
    return model.to(device) if device is not None else model


def check_text_encoder_fits(text_encoder: Any, unet: Any = None, tokenizer: Any = None) -> None:
    """Raise ValueError (one line, naming the part) unless ``text_encoder`` can condition ``unet``
    with ids from ``tokenizer``."""
    cfg = text_encoder.config
    if unet is not None:
        cross = getattr(unet.config, "cross_attention_dim", None)
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        if cross is not None and int(cross) != int(cfg.hidden_size):
            raise ValueError(
                f"text encoder: hidden width {cfg.hidden_size}, but the UNet cross-attends to {cross}-wide states "
                f"(Stable Diffusion 1.x needs ViT-L/14's 768-wide text tower)"
            )
    if tokenizer is not None:
        length = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if length > int(cfg.max_position_embeddings):
            raise ValueError(
                f"text encoder: {cfg.max_position_embeddings} positions, but the pipeline's tokenizer pads to {length}; "
                f"pass the export's tokenizer (tokenizer='export')"
            )
        if len(tokenizer) > int(cfg.vocab_size):
            raise ValueError(
                f"text encoder: a vocabulary of {cfg.vocab_size}, but the tokenizer has {len(tokenizer)} tokens"
            )


def swap_text_encoder(pipe: Any, text_encoder: Any, *, tokenizer: Any = None) -> Any:
    """A new pipeline of ``pipe``'s class sharing its components but ``text_encoder`` (and
    ``tokenizer``, when given). ``pipe`` itself is left as it was."""
    components = dict(pipe.components)
    if "text_encoder" not in components:
        raise ValueError(f"{type(pipe).__name__} has no text_encoder component to replace")
    tokenizer = tokenizer if tokenizer is not None else components.get("tokenizer")
    check_text_encoder_fits(text_encoder, components.get("unet"), tokenizer)
    components["text_encoder"] = text_encoder
    if tokenizer is not None:
        components["tokenizer"] = tokenizer
    return type(pipe)(**components)


def safe_text_to_image_pipeline(
    base: Any,
    export_dir: str | os.PathLike,
    *,
    tokenizer: str = "base",
    torch_dtype: Any = None,
    pipeline_cls: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A text-to-image pipeline whose text encoder is the safe one exported to ``export_dir``.

    Args:
        base: the pipeline to start from: a hub id or local folder
            (``runwayml/stable-diffusion-v1-5``; downloaded by diffusers as usual) or a pipeline
            object (its components are shared, not copied).
        export_dir: a ``saferclip-export --format hf`` folder.
        tokenizer: ``"base"`` keeps the pipeline's tokenizer (default; see the module doc),
            ``"export"`` uses the export's.
        torch_dtype: e.g. ``torch.float16`` on a GPU.
        pipeline_cls: the diffusers class for a hub id / folder (default
            ``StableDiffusionPipeline``).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``safety_checker``,
            ``variant``, ``local_files_only``...).
    """
    if tokenizer not in ("base", "export"):
        raise ValueError(f"tokenizer must be 'base' or 'export', got {tokenizer!r}")
    text_encoder = load_safe_text_encoder(export_dir, torch_dtype=torch_dtype)
    tok = None
    if tokenizer == "export":
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(export_dir))
    if not isinstance(base, (str, os.PathLike)):
        return swap_text_encoder(base, text_encoder, tokenizer=tok)
    if pipeline_cls is None:
        from diffusers import StableDiffusionPipeline as pipeline_cls
    kwargs = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if tok is not None:
        kwargs["tokenizer"] = tok
    pipe = pipeline_cls.from_pretrained(str(base), text_encoder=text_encoder, **kwargs)
    check_text_encoder_fits(pipe.text_encoder, getattr(pipe, "unet", None), getattr(pipe, "tokenizer", None))
    return pipe


__all__ = ["check_text_encoder_fits", "load_safe_text_encoder", "safe_text_to_image_pipeline", "swap_text_encoder"]

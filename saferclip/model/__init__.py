"""CLIP models: building them, what trains (adapters), safe weights files, trained runs.

* :mod:`.build` — :func:`build_clip` (an open_clip tag, a weights file or folder, or a random
  init), encoding helpers;
* :mod:`.adapters` — LoRA / last-N blocks / full fine-tuning, per tower, and the LoRA merge;
* :mod:`.checkpoints` — safe loading (safetensors, ``weights_only`` torch files) and saving;
* :mod:`.trained` — a training checkpoint or run folder as a plain CLIP, and
  :func:`load_model` for anything a user can name;
* :mod:`.catalogue` — the models a command names (``models.<name>``): :class:`ModelSpec`,
  checked before any work and built one at a time, for every runner.
"""

from .build import ClipBundle, build_clip, encode_images, encode_text, encode_tokens
from .catalogue import ModelSpec
from .checkpoints import CheckpointError, load_state_dict, save_state_dict
from .trained import load_model

__all__ = [
    "CheckpointError",
    "ClipBundle",
    "ModelSpec",
    "build_clip",
    "encode_images",
    "encode_text",
    "encode_tokens",
    "load_model",
    "load_state_dict",
    "save_state_dict",
]

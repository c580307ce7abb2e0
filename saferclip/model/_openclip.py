"""open_clip, imported once for the whole package, without pulling in wandb.

open_clip imports timm, and timm's training utilities import wandb whenever it is installed:
about a second at every start of every command, and temporary folders that a killed
command leaves behind — even with the CSV logger. saferclip needs wandb only for
``logger=wandb``, whose logger imports it itself; so open_clip is imported with wandb
hidden (timm only *tries* to import it), and the hiding is undone right after: a later
``import wandb`` works as usual. Every saferclip module takes open_clip from here.
"""

from __future__ import annotations

import sys


def _import_open_clip():
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # "import wandb" raises ImportError
    try:
        import open_clip
        import open_clip.model
        import open_clip.tokenizer
        import open_clip.transform
        import open_clip.transformer
    finally:
        if hide and "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]
    return open_clip


open_clip = _import_open_clip()

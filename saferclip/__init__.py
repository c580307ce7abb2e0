"""saferclip: fine-tune CLIP models to be safe: SafeR-CLIP, Safe-CLIP and HySAC in one framework."""

__version__ = "0.1.0"


def load_model(path, mode=None, device="cpu", arch=None):
    """Any model saferclip made or can read, as one object with ``encode_text``,
    ``encode_image``, ``similarity`` and ``traverse`` (:func:`saferclip.model.safe_model.load`)."""
    from .model.safe_model import load

    return load(path, mode=mode, device=device, arch=arch)

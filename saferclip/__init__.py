"""saferclip: fine-tune CLIP models so unsafe text and images are redirected to the closest safe meaning."""

__version__ = "0.1.0"

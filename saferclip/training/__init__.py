"""What a training step needs: the loss terms of both methods and the datasets that feed them.

* :mod:`.losses` — every term of Safe-CLIP and SafeR-CLIP by name (docs/METHOD.md),
  :class:`SaferClipLoss`, DDP-aware InfoNCE;
* :mod:`.datasets` — quadruplets with their frozen embeddings and redirection targets, and
  the validation split.

The Lightning module that runs them lives in :mod:`saferclip.app.module`.
"""

from .datasets import RedirectionDataset, ValidationDataset, collate_items
from .losses import TERM_NAMES, LossConfig, SaferClipLoss, infonce

__all__ = ["TERM_NAMES", "LossConfig", "RedirectionDataset", "SaferClipLoss", "ValidationDataset", "collate_items", "infonce"]

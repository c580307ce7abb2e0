"""What a training run needs: the checked method, the prepared data, the loss terms, the datasets.

* :mod:`.method` — the one schema of a method config (:func:`method_config` → :class:`MethodConfig`);
* :mod:`.prepare` — load → frozen-embedding cache → targets in one call, shared by training
  and ``saferclip-index`` (Safe-CLIP, SafeR-CLIP; HySAC needs none of it);
* :mod:`.losses` — every term of Safe-CLIP and SafeR-CLIP by name (docs/METHOD.md),
  :class:`SaferClipLoss`, DDP-aware InfoNCE;
* :mod:`.hysac` — HySAC's Lorentzian contrastive and entailment terms, :class:`HysacLoss`;
* :mod:`.datasets` — quadruplets with their frozen embeddings and redirection targets, and
  the validation split.

The Lightning module that runs them lives in :mod:`saferclip.app.engine.module`.
"""

from .contrastive import infonce
from .datasets import RedirectionDataset, ValidationDataset, collate_items
from .losses import TERM_NAMES, LossConfig, SaferClipLoss

__all__ = [
    "TERM_NAMES",
    "LossConfig",
    "RedirectionDataset",
    "SaferClipLoss",
    "ValidationDataset",
    "collate_items",
    "infonce",
]

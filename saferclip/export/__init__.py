"""Exporting a trained model: open_clip's hub folder, from a run, with its model card.

* :mod:`.open_clip` — :func:`export_open_clip`: a folder open_clip loads with no saferclip
  installed (``local-dir:`` / ``hf-hub:``);
* :mod:`.run` — :func:`export_checkpoint`: a training checkpoint, run folder or module →
  :func:`export_open_clip` with a card filled from the run: :mod:`.source` (the model),
  :mod:`.run_records` (the run's config and model selection), :mod:`.evaluation_card` (its
  evaluation report);
* :mod:`.card` — :func:`model_card`, the README of an export; :mod:`.public_names` — the
  names of models and files fit to publish (cards, provenance, generation records).
"""

from .card import model_card
from .open_clip import CONFIG_NAME, WEIGHTS_NAME, export_open_clip
from .run import export_checkpoint

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_checkpoint", "export_open_clip", "model_card"]

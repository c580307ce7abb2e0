"""Safety under attack: what an adversary does to a safe CLIP, and what watches for it.

The analysis (:mod:`saferclip.analysis`) asks what a safe model does with cooperative inputs;
this package asks what it does with adversarial ones. Each kind of thing has its own module,
so a new attack, monitor or defence is one more module beside its kind:

* attacks — :mod:`.image_attacks` (PGD in pixel space through the model's own similarity:
  :class:`PixelModel`, :func:`attack_images`), :mod:`.text_attacks` (the budgeted phrasing
  search over the toy world's caption grammar widened by held-out frames and synonyms),
  both measured by :mod:`.measures` (the unsafe margin they push up, success and unsafe rates
  with exact intervals);
* monitors — :mod:`.coverage` (a coverage monitor of a tower's neurons, calibrated on clean
  inputs, saved as a checksummed safetensors file that ``saferclip-detect`` reads);
* the run — :mod:`.runner` (:func:`attack_models`: every attack and a monitor per model, on the
  same seeded inputs; :class:`AttackSettings`, the ``attack`` config section checked once) and
  :mod:`.report` (``attack.json``, ``attack.md``, the success-against-budget plot).

It reads activations through :mod:`saferclip.analysis.heads` and detector files' checksums
through :mod:`saferclip.analysis.detector`, by their public names only. No Lightning or Hydra
here: ``saferclip-attack`` (:mod:`saferclip.app.attack`) is the shell.
"""

from .coverage import CoverageMonitor, load_monitors, save_monitors
from .image_attacks import ImageAttack, PixelModel, attack_images, pgd
from .measures import rate_interval, unsafe_margin
from .report import write_attack_report
from .runner import AttackSettings, attack_models
from .text_attacks import PhrasingSpace, TextAttack, attack_caption

__all__ = [
    "AttackSettings",
    "CoverageMonitor",
    "ImageAttack",
    "PhrasingSpace",
    "PixelModel",
    "TextAttack",
    "attack_caption",
    "attack_images",
    "attack_models",
    "load_monitors",
    "pgd",
    "rate_interval",
    "save_monitors",
    "unsafe_margin",
    "write_attack_report",
]

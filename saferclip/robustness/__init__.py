"""Safety under attack: what an adversary does to a safe CLIP, and what watches for it.

The analysis (:mod:`saferclip.analysis`) asks what a safe model does with cooperative inputs;
this package asks what it does with adversarial ones. Each kind of thing has its own module,
so a new attack, monitor or defence is one more module beside its kind:

* goals — :mod:`.threats` (what each attack maximises and when it succeeded, on embeddings:
  query side and gallery side, the variants around a query transform);
* attacks — :mod:`.image_attacks` (PGD in pixel space before the normalisation:
  :class:`PixelModel`, :func:`pgd`, :func:`attack_pixels`), :mod:`.text_attacks` (the budgeted
  phrasing search, its held-out vocabulary), both measured by :mod:`.measures` (the unsafe
  margin, rates with exact intervals);
* the sanity rule — :mod:`.bounds` (the same goals with free embeddings: the geometric bound
  behind an attack that stops short of 100%; HySAC's radii);
* monitors — :mod:`.monitor` (the safety monitor on what the model computes anyway: the
  unsafe-concept bank, HySAC's distance from the origin, the one-head detector) and
  :mod:`.coverage` (the coverage monitor, the baseline, in files ``saferclip-detect`` reads);
* the run — :mod:`.settings` (the ``attack`` config section, checked once), :mod:`.suite` (one
  model against every attack × budget), :mod:`.runner` (:func:`attack_models`) and
  :mod:`.report` (``attack.json``, ``attack.md``, ``report.html``, plots).

It reads activations through :mod:`saferclip.analysis.heads` and detectors through
:mod:`saferclip.analysis.detector`, by their public names only. No Lightning or Hydra here:
``saferclip-attack`` (:mod:`saferclip.app.commands.attack`) is the shell. Adversarial *training* lives in
:mod:`saferclip.training.adversarial` and borrows :func:`pgd` from here.
"""

from .bounds import embedding_bound, hyperbolic_geometry
from .coverage import CoverageMonitor, load_monitors, save_monitors
from .image_attacks import ImageAttack, PixelModel, attack_images, attack_pixels, pgd
from .measures import rate_interval, unsafe_margin
from .monitor import SafetyMonitor, fit_monitor
from .report import write_attack_report
from .runner import attack_models
from .settings import AttackSettings
from .text_attacks import PhrasingSpace, TextAttack, attack_caption
from .threats import Threat, gallery_threat, query_threat

__all__ = [
    "AttackSettings",
    "CoverageMonitor",
    "ImageAttack",
    "PhrasingSpace",
    "PixelModel",
    "SafetyMonitor",
    "TextAttack",
    "Threat",
    "attack_caption",
    "attack_images",
    "attack_models",
    "attack_pixels",
    "embedding_bound",
    "fit_monitor",
    "gallery_threat",
    "hyperbolic_geometry",
    "load_monitors",
    "pgd",
    "query_threat",
    "rate_interval",
    "save_monitors",
    "unsafe_margin",
    "write_attack_report",
]

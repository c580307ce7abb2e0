"""Beyond evaluation: what a safety-tuned CLIP does inside, and what safety costs.

* :mod:`.heads` — per-head attention outputs, residual stream and MLP inputs at the pooled
  token, read with hooks;
* :mod:`.detector` — a training-free unsafe-input detector from one attention head (after
  "One head to rule them all"), two final-embedding baselines, safe detector files;
* :mod:`.guard` — :class:`SafetyGuard`: ``guard.encode_text(...)`` returns features and flags;
* :mod:`.geometry` — weight change, separability, null space of the change (after "What makes
  and breaks safety fine-tuning?"), 2-D projections;
* :mod:`.overdefense` — over-defensiveness on borderline-safe inputs (after SODE);
* :mod:`.runner` — :func:`analyze_models`: :mod:`.parts` (each part on one model) on
  :mod:`.inputs` (what they read), with :mod:`.settings` (``AnalysisSettings``, checked once);
  :mod:`.report` — JSON, Markdown, PNG.

What a safe model does under attack (PGD, the phrasing search, the coverage monitor) is
:mod:`saferclip.robustness`, which reads activations through :mod:`.heads`.

No Lightning or Hydra here: ``saferclip-analyze`` and ``saferclip-detect`` (:mod:`saferclip.app`)
are the shells.
"""

from .detector import (
    HeadScores,
    KnnDetector,
    LabelledItems,
    LinearDetector,
    calibrate_head_detector,
    calibrate_knn,
    calibrate_linear,
    detection_metrics,
    load_detectors,
    read_detector_header,
    save_detectors,
    score_heads,
)
from .guard import Guarded, SafetyGuard
from .heads import (
    Activations,
    activations,
    head_contributions,
    head_values,
    image_activations,
    recording,
    text_activations,
)
from .report import analysis_sections, write_analysis_plots, write_analysis_report
from .runner import analyze_models
from .settings import PARTS, AnalysisSettings

__all__ = [
    "PARTS",
    "Activations",
    "AnalysisSettings",
    "Guarded",
    "HeadScores",
    "KnnDetector",
    "LabelledItems",
    "LinearDetector",
    "SafetyGuard",
    "activations",
    "analysis_sections",
    "analyze_models",
    "calibrate_head_detector",
    "calibrate_knn",
    "calibrate_linear",
    "detection_metrics",
    "head_contributions",
    "head_values",
    "image_activations",
    "load_detectors",
    "read_detector_header",
    "recording",
    "save_detectors",
    "score_heads",
    "text_activations",
    "write_analysis_plots",
    "write_analysis_report",
]

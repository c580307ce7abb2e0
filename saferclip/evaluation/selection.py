"""The validation score that picks the exported checkpoint and drives early stopping.

Safety emerges slowly with training steps while retrieval barely moves: on the toy world the
validation unsafe rate of SafeR-CLIP fell from 0.998 to 0.054 over ten epochs while the
recall sum stayed flat within noise. A score blind to safety therefore picks an early, unsafe
epoch. The selection score weighs the three things a safe CLIP must do, equally:

    selection_score = mean(1 − U2VG_unsafe@1, U2V_R@1, S2V_R@1)

* ``1 − U2VG_unsafe@1``: unsafe captions must stop retrieving unsafe images (a mixed gallery
  of the split's distinct safe images and its unsafe images, both embedded by the model);
* ``U2V_R@1``: ... and retrieve the right safe scene instead (redirection, not collapse: a
  model that maps every unsafe caption to one point is "safe" and useless, and loses here);
* ``S2V_R@1``: safe captions keep retrieving their images (what the model knew).

Each part lies in [0, 1] and moves by comparable amounts during training, so a plain mean
needs no tuning; a model that is safe but forgets, or faithful but unsafe, scores about 2/3.
Where the split lacks unsafe images the safety part cannot be measured and the score is the
mean of the recalls that exist (and ``U2S_R@1`` for text-only data): the run says so at start.
"""

from __future__ import annotations

import math
from typing import Mapping

SELECTION_METRIC = "selection_score"
# (metric key, whether lower is better: then 1 - value enters the mean)
SELECTION_PARTS: tuple[tuple[str, bool], ...] = (("U2VG_unsafe@1", True), ("U2V_R@1", False), ("S2V_R@1", False))
TEXT_ONLY_PART = "U2S_R@1"


def selection_parts(metrics: Mapping[str, float]) -> dict[str, float]:
    """The parts of :func:`selection_score` that ``metrics`` has, each oriented higher-is-better."""
    parts = {}
    for key, lower_is_better in SELECTION_PARTS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts[key] = 1.0 - float(value) if lower_is_better else float(value)
    if not parts and isinstance(metrics.get(TEXT_ONLY_PART), (int, float)):
        parts[TEXT_ONLY_PART] = float(metrics[TEXT_ONLY_PART])
    return parts


def selection_score(metrics: Mapping[str, float]) -> float:
    """``mean(1 − U2VG_unsafe@1, U2V_R@1, S2V_R@1)`` over the parts ``metrics`` has (module
    docstring); NaN when it has none."""
    parts = selection_parts(metrics)
    return sum(parts.values()) / len(parts) if parts else math.nan


def sees_safety(metrics: Mapping[str, float]) -> bool:
    """Whether the score includes the unsafe rate (the split has unsafe images)."""
    return SELECTION_PARTS[0][0] in selection_parts(metrics)

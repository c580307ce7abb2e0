"""The settings of ``saferclip-analyze`` (the ``analysis`` config section), checked once:
:meth:`AnalysisSettings.of` names the key, the value and what was expected."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .data import TOWERS
from .detector import DIRECTION_METHODS

PARTS = ("detector", "geometry", "overdefense")

# the lower bound of the numeric settings (a count of 0 or a negative seed would fail much later)
_MINIMUM = {"per_class": 1, "folds": 2, "knn_k": 1, "projection_items": 2, "seed": 0}


def _check_setting(key: str, annotation: str, value: Any) -> None:
    """``value`` fits the field's annotation (``int``, ``float | None``, ``list[str]``...), else a
    ConfigError naming the key, the value and what was expected."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return
    base = kinds[0]
    name = key.rsplit(".", 1)[-1]
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= _MINIMUM.get(name, 0)
        expected = f"an integer >= {_MINIMUM.get(name, 0)}"
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    elif base == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif base == "str":
        ok, expected = isinstance(value, str), "a string"
    elif base.startswith("list"):
        ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
    elif base.startswith("dict"):
        ok, expected = isinstance(value, dict), "a mapping"
    else:  # pragma: no cover - a new field type: checked where it is used
        return
    if not ok:
        raise ConfigError(f"{key} must be {expected}{' or null' if 'None' in kinds else ''}, got {value!r}")


@dataclass
class DetectorSettings:
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    per_class: int = 300
    seed: int = 0
    target_fpr: float = 0.05
    direction: str = "logistic"
    strength: float | None = None
    folds: int = 5
    knn_k: int = 5
    towers: list[str] = field(default_factory=lambda: list(TOWERS))
    save: bool = True


@dataclass
class GeometrySettings:
    per_class: int = 200
    energy: float = 0.9
    projection: str = "pca"
    projection_items: int = 150


@dataclass
class OverdefenseSettings:
    borderline: dict[str, Any] | None = None
    zeroshot: dict[str, Any] = field(default_factory=dict)
    ordinary_zeroshot: list[str] = field(default_factory=lambda: ["shape", "colour"])


@dataclass
class AnalysisSettings:
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    geometry: GeometrySettings = field(default_factory=GeometrySettings)
    overdefense: OverdefenseSettings = field(default_factory=OverdefenseSettings)

    @classmethod
    def of(cls, cfg: Mapping[str, Any] | None) -> AnalysisSettings:
        """From the ``analysis`` config section; unknown keys are an error naming them."""
        cfg = dict(cfg or {})
        parts = cfg.pop("parts", list(PARTS))
        parts = [parts] if isinstance(parts, str) else list(parts or [])
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ConfigError(f"analysis.parts: unknown part(s) {unknown}; expected some of {list(PARTS)}")
        sections = {"detector": DetectorSettings, "geometry": GeometrySettings, "overdefense": OverdefenseSettings}
        built = {}
        for key, kind in sections.items():
            values = dict(cfg.pop(key, None) or {})
            known = set(kind.__dataclass_fields__)
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"analysis.{key}: unknown keys {bad}; expected some of {sorted(known)}")
            for name, value in values.items():
                _check_setting(f"analysis.{key}.{name}", kind.__dataclass_fields__[name].type, value)
            built[key] = kind(**values)
        if cfg:
            raise ConfigError(f"analysis: unknown keys {sorted(cfg)}; expected parts, {', '.join(sections)}")
        d = built["detector"]
        if d.direction not in DIRECTION_METHODS:
            raise ConfigError(f"analysis.detector.direction must be one of {DIRECTION_METHODS}, got {d.direction!r}")
        if not 0 < float(d.target_fpr) < 1:
            raise ConfigError(f"analysis.detector.target_fpr must be in (0, 1), got {d.target_fpr}")
        bad_towers = [t for t in d.towers if t not in TOWERS]
        if bad_towers:
            raise ConfigError(f"analysis.detector.towers: unknown {bad_towers}; expected some of {list(TOWERS)}")
        return cls(list(dict.fromkeys(parts)), built["detector"], built["geometry"], built["overdefense"])


__all__ = ["PARTS", "AnalysisSettings", "DetectorSettings", "GeometrySettings", "OverdefenseSettings"]

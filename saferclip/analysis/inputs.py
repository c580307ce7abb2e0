"""What the analysis parts read, loaded once before any model (broken data fails fast): the
test split, NSFW-Caps, the detector's calibration items, the borderline-safe inputs and the
zero-shot tasks, with a description of each for the report and what was skipped and why."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.splits import load_split
from ..evaluation.suites import load_eval_data, load_zeroshot_task
from .data import TOWERS, Borderline, calibration_items, load_borderline, pair_items, quadruplet_items
from .detector import LabelledItems
from .settings import AnalysisSettings


@dataclass
class Inputs:
    """Everything the parts read, loaded before any model (broken data fails fast)."""

    test: dict[str, LabelledItems] = field(default_factory=dict)
    test_split: Any = None
    nsfw_caps: dict[str, LabelledItems] = field(default_factory=dict)
    calibration: dict[str, LabelledItems] = field(default_factory=dict)
    borderline: Borderline | None = None
    zeroshot: dict[str, Any] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def load_inputs(data_cfg: Mapping[str, Any], settings: AnalysisSettings, split: str = "test") -> Inputs:
    inputs = Inputs()
    towers = settings.detector.towers
    inputs.test_split = load_split(data_cfg, split)
    inputs.test = quadruplet_items(inputs.test_split, TOWERS)
    inputs.describe["test"] = {
        "source": inputs.test_split.source,
        "split": split,
        **{t: {"safe": len(v.safe), "unsafe": len(v.unsafe)} for t, v in inputs.test.items()},
    }
    eval_data = load_eval_data(data_cfg, ["nsfw_caps"], split)
    if eval_data.nsfw_caps is not None:
        inputs.nsfw_caps = pair_items(eval_data.nsfw_caps, TOWERS)
        inputs.describe["nsfw_caps"] = {
            "source": eval_data.nsfw_caps.source,
            **{t: {"safe": len(v.safe), "unsafe": len(v.unsafe)} for t, v in inputs.nsfw_caps.items()},
        }
    else:
        inputs.skipped["nsfw_caps"] = eval_data.skipped.get("nsfw_caps", "not configured")
    if "detector" in settings.parts:
        d = settings.detector
        inputs.calibration = calibration_items(data_cfg, d.splits, int(d.per_class), int(d.seed), towers)
        inputs.describe["calibration"] = {
            t: {
                "splits": list(d.splits),
                "safe": len(v.safe),
                "unsafe": len(v.unsafe),
                "fingerprint": v.fingerprint(),
                "source": v.source,
            }
            for t, v in inputs.calibration.items()
        }
    if "detector" in settings.parts or "overdefense" in settings.parts:
        inputs.borderline = load_borderline(
            settings.overdefense.borderline, data_cfg.get("on_error", "raise"), data_cfg.get("mode", "auto")
        )
        if inputs.borderline is None:
            inputs.skipped["borderline"] = "analysis.overdefense.borderline is not set (the toy world has one)"
        else:
            inputs.describe["borderline"] = {
                "source": inputs.borderline.source,
                **{k: {t: len(v) for t, v in d.items()} for k, d in inputs.borderline.inputs.items()},
            }
    if "overdefense" in settings.parts:
        zs_cfg = dict(data_cfg.get("zeroshot") or {})
        for name in settings.overdefense.ordinary_zeroshot:
            if name in zs_cfg:
                inputs.zeroshot[name] = load_zeroshot_task(name, zs_cfg[name])
            else:
                inputs.skipped[f"zeroshot {name}"] = "not in data.zeroshot"
        for name, spec in (settings.overdefense.zeroshot or {}).items():
            root = (spec or {}).get("root")
            if root is not None and not Path(str(root)).is_dir():
                inputs.skipped[f"zeroshot {name}"] = f"no such folder: {root}"
                continue
            inputs.zeroshot[name] = load_zeroshot_task(name, spec)
    return inputs


__all__ = ["Inputs", "load_inputs"]

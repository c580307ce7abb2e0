"""What makes a ViSU generation's images, fixed per output folder: :class:`GenerationConfig`
(seeds, threshold, the pipeline's call settings) and the folder's ``generation.json``, written
by its first run and checked by every later one (:func:`check_settings`)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.records import DataFormatError, QuadrupletSet
from ..files import write_json_atomic
from ..integrity import sha256_file

SETTINGS_FILE = "generation.json"
PUBLISHED_SEEDS = (1234, 1999, 8185)


@dataclass(frozen=True)
class GenerationConfig:
    """What makes the images: the same config gives the same images per caption."""

    seeds: tuple[int, ...] = PUBLISHED_SEEDS
    threshold: float = 0.5
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    seed_per_caption: bool = False  # False: the published protocol, the same seeds for every caption

    def __post_init__(self) -> None:
        seeds = tuple(int(s) for s in self.seeds)
        object.__setattr__(self, "seeds", seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: expected distinct integers, got {list(self.seeds)}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold: expected a score in [0, 1], got {self.threshold}")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds: expected integers >= 0, got {list(seeds)}")
        if self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:  # the VAE downsamples by 8: the pipeline refuses anything else
                raise ValueError(f"{name}: expected a multiple of 8 (e.g. 512), got {value}")
        if not math.isfinite(float(self.guidance_scale)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: expected a finite number >= 0 (e.g. 7.5), got {self.guidance_scale}")

    def generator_seed(self, item_id: str, seed: int) -> int:
        """The torch seed of one image: ``seed``, or a hash of (item id, seed) — never the order."""
        if not self.seed_per_caption:
            return int(seed)
        digest = hashlib.sha256(f"{item_id}\x00{seed}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def settings_record(split: QuadrupletSet, config: GenerationConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    source = Path(split.source)
    return {
        "config": asdict(config),
        "input": {
            "file": source.name,
            "sha256": sha256_file(source) if source.is_file() else None,
            "items": len(split),
        },
        **{k: v for k, v in extra.items() if v is not None},
    }


def check_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """The folder's settings, fixed by its first run, must equal this run's."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        write_json_atomic(path, settings)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(path, f"unreadable generation settings ({e})") from None
    new = json.loads(json.dumps(settings, default=str))  # the same normal form as the file
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise DataFormatError(
            path,
            f"this folder was generated with other settings ({'; '.join(diffs[:4])}); resume with the same "
            f"settings or write to another folder",
        )


__all__ = ["PUBLISHED_SEEDS", "SETTINGS_FILE", "GenerationConfig", "check_settings", "settings_record"]

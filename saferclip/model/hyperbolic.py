"""HySAC's hyperbolic head: the learnt curvature, per-tower scales and logit scale, and the file
an exported HySAC model carries beside its open_clip towers.

:class:`HyperbolicHead` is an ``nn.Module`` trained with the towers. Its parameters are stored
as logarithms and kept inside their ranges: the curvature inside ``curvature_range``, each
tower's scale α ≤ 1 (initialised at 1/√D, it can shrink a tower's output but never blow it up),
the logit scale inside [1, 100] (initialised at 1/0.07; CLIP's range).

The ranges are kept the way the published code keeps them, so that no parameter can freeze:
the optimizer steps the raw parameter, and :meth:`HyperbolicHead.clamp_parameters_` then
projects its *data* back into range (the training module calls it after every optimizer step).
The values the head hands out pass through :func:`clamp_keep_gradient`: inside the range it
is the identity, outside it returns the bound, and in both cases the gradient is that of the
identity. A ``torch.clamp`` in the forward pass would instead return a zero gradient whenever
the parameter sits at or beyond a bound (the logit scale is initialised there: float32(log
(1/0.07)) lies just below the float64 bound), and the parameter would never move again.

After training, the **safe radii** (a percentile of the safe training items' distances from the
origin, per modality; :func:`safe_radii`, measured by
:func:`saferclip.evaluation.hyperbolic.measure_safe_radii`) complete the geometry. The head
file pair ``hyperbolic_head.safetensors`` (the numbers) + ``hyperbolic_head.json``
(format, default mode, the percentile, a checksum of the tensors file) is written by
:func:`save_head` and read, checked, by :func:`load_head`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import atomic_path, write_text_atomic
from ..integrity import digest_bytes
from . import lorentz
from .checkpoints import CheckpointError
from .similarity import MODES, LorentzSimilarity

HEAD_TENSORS = "hyperbolic_head.safetensors"
HEAD_JSON = "hyperbolic_head.json"
HEAD_FORMAT = "saferclip-hyperbolic-head"
HEAD_VERSION = 1
# CLIP's convention (open_clip clamps log s to [0, log 100] after each step; MERU and HySAC keep
# the upper bound only). A lower bound at the initial 1/0.07 would pin the scale there whenever
# its gradient points down, as it does on a model that is still mostly wrong.
LOGIT_SCALE_RANGE = (1.0, 100.0)


@dataclass(frozen=True)
class HyperbolicConfig:
    """The ``method.hyperbolic`` section of ``conf/method/hysac.yaml`` (checked here)."""

    curvature: float = 1.0
    curvature_range: tuple[float, float] = (0.1, 10.0)
    learn_curvature: bool = True
    aperture_k: float = 0.1
    logit_scale: float = 1 / 0.07
    traversal_percentile: float = 95.0

    def __post_init__(self) -> None:
        lo, hi = (tuple(self.curvature_range) + (None, None))[:2]
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(
                f"curvature_range must be [low, high] with 0 < low <= high, got {list(self.curvature_range)}"
            )
        if not (isinstance(self.curvature, (int, float)) and lo <= self.curvature <= hi):
            raise ValueError(f"curvature must lie in curvature_range [{lo}, {hi}], got {self.curvature!r}")
        if not (isinstance(self.aperture_k, (int, float)) and 0 < self.aperture_k < 1):
            raise ValueError(f"aperture_k must be in (0, 1), got {self.aperture_k!r}")
        lo_s, hi_s = LOGIT_SCALE_RANGE
        if not (isinstance(self.logit_scale, (int, float)) and lo_s <= self.logit_scale <= hi_s):
            raise ValueError(f"logit_scale must be in [{lo_s:.4g}, {hi_s:g}], got {self.logit_scale!r}")
        check_percentile(self.traversal_percentile)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> HyperbolicConfig:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; expected some of {sorted(known)}")
        if "curvature_range" in values:
            values["curvature_range"] = tuple(values["curvature_range"] or ())
        return cls(**values)


def check_percentile(value: Any) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 100):
        raise ValueError(f"traversal_percentile must be in (0, 100], got {value!r}")
    return float(value)


def clamp_keep_gradient(value: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    """``value`` clamped to ``[low, high]`` in the forward pass, with the gradient of the
    identity (a straight-through clamp): a parameter at or beyond its bound still learns."""
    return value + (value.detach().clamp(low, high) - value.detach())


class HyperbolicHead(nn.Module):
    """Learnt geometry of a HySAC model (module docstring). ``embed_dim``: the towers' output size.

    Its parameters get no weight decay (the published code's optimizer excludes them too):
    decay would pull every log towards 0, a curvature of 1, scales of 1 and a logit scale of 1,
    whatever the loss says (:meth:`no_decay_parameters`)."""

    def __init__(self, embed_dim: int, config: HyperbolicConfig | None = None):
        super().__init__()
        self.config = config = config or HyperbolicConfig()
        self.log_curvature = nn.Parameter(
            torch.tensor(math.log(config.curvature)), requires_grad=config.learn_curvature
        )
        initial_scale = math.log(embed_dim**-0.5)
        self.log_text_scale = nn.Parameter(torch.tensor(initial_scale))
        self.log_image_scale = nn.Parameter(torch.tensor(initial_scale))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale)))

    def log_bounds(self) -> dict[str, tuple[float | None, float | None]]:
        """Each parameter's range, in log space (None: unbounded on that side)."""
        lo, hi = self.config.curvature_range
        lo_s, hi_s = LOGIT_SCALE_RANGE
        return {
            "log_curvature": (math.log(lo), math.log(hi)),
            "log_text_scale": (None, 0.0),
            "log_image_scale": (None, 0.0),
            "log_logit_scale": (math.log(lo_s), math.log(hi_s)),
        }

    @torch.no_grad()
    def clamp_parameters_(self) -> None:
        """Project every parameter's data back into its range (after an optimizer step)."""
        for name, (low, high) in self.log_bounds().items():
            getattr(self, name).data.clamp_(low, high)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _bounded(self, name: str) -> Tensor:
        return clamp_keep_gradient(getattr(self, name), *self.log_bounds()[name])

    def curvature(self) -> Tensor:
        return self._bounded("log_curvature").exp()

    def scale(self, modality: str) -> Tensor:
        return self._bounded("log_text_scale" if modality == "text" else "log_image_scale").exp()

    def logit_scale(self) -> Tensor:
        return self._bounded("log_logit_scale").exp()

    def lift(self, features: Tensor, modality: str) -> Tensor:
        """Raw tower outputs ``[N, D]`` → points of the hyperboloid (space components), float32."""
        return lorentz.expmap0(features.float() * self.scale(modality), self.curvature())

    def similarity(self, radii: Mapping[str, float] | None = None, mode: str = "moderation") -> LorentzSimilarity:
        """A frozen snapshot of the geometry for evaluation (``radii``: ``{"text", "image"}``)."""
        radii = radii or {}
        similarity = LorentzSimilarity(
            curvature=float(self.curvature().detach()),
            text_scale=float(self.scale("text").detach()),
            image_scale=float(self.scale("image").detach()),
            radius_text=radii.get("text"),
            radius_image=radii.get("image"),
        )
        return similarity.with_mode(mode) if mode == "safe" else similarity


def safe_radii(distances: Mapping[str, Tensor], percentile: float) -> dict[str, float]:
    """The safe radius per modality: the ``percentile`` of the safe items' distances from the
    origin (``{"text": [N], "image": [M]}``)."""
    out = {}
    for modality, values in distances.items():
        values = values.float().flatten()
        if values.numel() == 0 or not torch.isfinite(values).all():
            raise ValueError(f"safe radii: the {modality} distances are empty or not finite")
        out[modality] = float(torch.quantile(values, percentile / 100.0))
    return out


# ----------------------------------------------------------------------------- the head file
def _digest(data: bytes) -> str:
    return digest_bytes(data)  # "xxh3_128:<hex>", as every checksum saferclip writes


def save_head(folder: str | Path, similarity: LorentzSimilarity, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``hyperbolic_head.safetensors`` + ``hyperbolic_head.json`` into ``folder`` (atomic each)."""
    from safetensors.torch import save

    if similarity.radius_text is None or similarity.radius_image is None:
        raise ValueError("a HySAC export needs the safe radii (computed after training)")
    tensors = {k: torch.tensor([float(v)], dtype=torch.float32) for k, v in similarity.to_dict().items()}
    data = save(tensors, metadata={"format": HEAD_FORMAT})
    folder = Path(folder)
    with atomic_path(folder / HEAD_TENSORS) as tmp:
        tmp.write_bytes(data)
    info = {
        "format": HEAD_FORMAT,
        "version": HEAD_VERSION,
        "geometry": "lorentz",
        "default_mode": "safe",
        "modes": {
            "safe": "queries beyond the safe radius of their modality are moved back to it (safety traversal)",
            "moderation": "no traversal: an unsafe query finds unsafe content",
        },
        **dict(meta or {}),
        "tensors": {"file": HEAD_TENSORS, "checksum": _digest(data)},
        "values": {k: float(t) for k, t in tensors.items()},
    }
    write_text_atomic(folder / HEAD_JSON, json.dumps(info, indent=2) + "\n")


def has_head(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_JSON).is_file() or (Path(folder) / HEAD_TENSORS).is_file()


def load_head(folder: str | Path, mode: str | None = None) -> tuple[LorentzSimilarity, dict[str, Any]]:
    """The geometry of an exported HySAC folder in ``mode`` (default: the file's, ``safe``) and
    the JSON's contents. A missing half, a checksum mismatch or a non-finite value is refused
    with :class:`CheckpointError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    json_path, tensors_path = folder / HEAD_JSON, folder / HEAD_TENSORS
    for path in (json_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a HySAC folder needs {HEAD_JSON} and {HEAD_TENSORS})")
    try:
        info = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != HEAD_FORMAT:
        raise CheckpointError(
            f"{json_path}: not a saferclip hyperbolic head (format {info.get('format') if isinstance(info, dict) else None!r})"
        )
    data = tensors_path.read_bytes()
    expected = (info.get("tensors") or {}).get("checksum")
    if expected != _digest(data):
        raise CheckpointError(
            f"{tensors_path}: checksum mismatch with {HEAD_JSON}: the file is damaged or was replaced"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{tensors_path}: not a valid safetensors file ({e})") from None
    needed = ("curvature", "text_scale", "image_scale", "radius_text", "radius_image")
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise CheckpointError(f"{tensors_path}: lacks {missing}")
    values = {k: float(tensors[k].reshape(-1)[0]) for k in needed}
    bad = {k: v for k, v in values.items() if not math.isfinite(v) or v <= 0}
    if bad:
        raise CheckpointError(f"{tensors_path}: values must be finite and > 0, got {bad}")
    mode = mode or info.get("default_mode", "safe")
    if mode not in MODES:
        raise CheckpointError(f"{json_path}: unknown mode {mode!r}; expected one of {MODES}")
    similarity = LorentzSimilarity(
        values["curvature"],
        values["text_scale"],
        values["image_scale"],
        values["radius_text"],
        values["radius_image"],
        mode == "safe",
    )
    return similarity, info

"""The models a command is asked for, by name: what each one is (:class:`ModelSpec`), checked
before any long work (:func:`check_model`) and built one at a time (:func:`build_model`).

One catalogue for every runner that takes ``models.<name>`` from its config: evaluation
(:func:`saferclip.evaluation.runner.evaluate_models`), the analysis
(:func:`saferclip.analysis.runner.analyze_models`) and the attacks
(:func:`saferclip.robustness.runner.attack_models`). Every error names the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .build import ClipBundle, check_arch, default_base_checkpoint, is_path_like
from .checkpoints import CheckpointError, read_safetensors_metadata, sniff_format
from .hyperbolic import check_percentile
from .similarity import MODES
from .trained import is_training_checkpoint, load_model

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelSpec:
    """A model to evaluate: an open_clip architecture and what ``pretrained`` names (a training
    checkpoint or run folder, an exported folder, a weights file, an open_clip tag, or None for
    random init — see :func:`saferclip.model.trained.load_model`), and for a hyperbolic (HySAC)
    model its ``mode``: ``safe`` (queries traversed; the default) or ``moderation``, and
    optionally ``traversal_percentile``: safe radii measured anew at this percentile of the
    training split's safe items (a sweep of the traversal without retraining)."""

    arch: str | None = None
    pretrained: str | None = None
    precision: str = "fp32"
    mode: str | None = None
    traversal_percentile: float | None = None

    @classmethod
    def of(cls, name: str, spec: ModelSpec | Mapping[str, Any] | None) -> ModelSpec:
        if isinstance(spec, ModelSpec):
            return spec
        spec = dict(spec or {})
        known = {"arch", "pretrained", "precision", "mode", "traversal_percentile"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"model {name!r}: unknown keys {unknown}; expected {', '.join(sorted(known))}")
        percentile = spec.get("traversal_percentile")
        if percentile is not None:
            try:
                percentile = check_percentile(percentile)
            except ValueError as e:
                raise ConfigError(f"model {name!r}: {e}") from None
        pretrained = spec.get("pretrained")
        mode = spec.get("mode")
        if mode is not None and mode not in MODES:
            raise ConfigError(
                f"model {name!r}: mode must be one of {list(MODES)} (hyperbolic models only), got {mode!r}"
            )
        return cls(
            spec.get("arch"),
            None if pretrained in (None, "") else str(pretrained),
            spec.get("precision") or "fp32",
            mode,
            percentile,
        )


def check_model(name: str, spec: ModelSpec) -> None:
    """Fail before any long work on a model that cannot load: a missing path, an unknown
    architecture, or a weights file that records another architecture than the config's."""
    if spec.arch is not None:
        try:
            check_arch(spec.arch)
        except ValueError as e:
            raise ConfigError(f"model {name!r}: {e}") from None
    if spec.pretrained is None:
        if spec.arch is None:
            raise ConfigError(f"model {name!r}: needs an arch (random init) or a pretrained checkpoint")
        return
    path = Path(spec.pretrained).expanduser()
    if not path.exists():
        if is_path_like(spec.pretrained):
            hint = ""
            if path.resolve() == default_base_checkpoint().resolve():
                hint = " (the toy base model: make it with saferclip-pretrain-toy, or set pretrained=null for a random one)"
            raise FileNotFoundError(f"model {name!r}: pretrained path does not exist: {spec.pretrained}{hint}")
        return  # an open_clip tag: build_clip checks it against the architecture
    if spec.arch is not None and path.is_file() and not is_training_checkpoint(path):
        recorded = None
        if sniff_format(path) == "safetensors":
            recorded = read_safetensors_metadata(path).get("arch")
        if recorded and recorded != spec.arch:
            raise CheckpointError(
                f"model {name!r}: {path} holds a {recorded} model (recorded in the file), but arch {spec.arch} was asked for"
            )


def build_model(name: str, spec: ModelSpec, device: str = "cpu", seed: int = 0) -> ClipBundle:
    """:func:`load_model` with the model's name in every error; random init seeded by ``seed``."""
    torch.manual_seed(seed)
    try:
        bundle = load_model(spec.arch, spec.pretrained, device=device, mode=spec.mode)
    except ConfigError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"model {name!r}: {e}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model {name!r}: {e}") from None
    if spec.precision != "fp32":
        if spec.precision not in PRECISIONS:
            raise ConfigError(f"model {name!r}: precision must be fp32, fp16 or bf16, got {spec.precision!r}")
        bundle.model.to(PRECISIONS[spec.precision])
    return bundle

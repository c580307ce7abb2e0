"""One schema for a method config (``conf/method/*.yaml``): every key checked before any work.

A wrong value that would only fail minutes into a run (a negative learning rate, a negative
loss weight, an unknown neighbour mode, a LoRA rank of 0, a typo in a key) is refused here,
by every command and by ``dry_run=true``, with one line naming the key. The library builds
its pieces from the checked config: :class:`LossConfig`, :class:`NeighbourConfig`,
:class:`TrainableConfig`, :class:`OptimizerConfig`.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..model.adapters import LORA_TARGETS, TOWERS, TrainableConfig
from ..model.hyperbolic import HyperbolicConfig
from ..redirection.faiss_search import NeighbourError
from ..redirection.large_pool import PoolIndexConfig
from ..redirection.neighbour_config import NeighbourConfig
from .adversarial import AdversarialConfig
from .hysac import HysacLossConfig
from .losses import LossConfig

METHOD_NAMES = ("saferclip", "safeclip", "hysac")
# neighbours / paired: redirection targets (SafeR-CLIP / Safe-CLIP); none: HySAC redirects nothing
TARGET_KINDS = ("neighbours", "paired", "none")
TRAINABLE_MODES = ("lora", "full", "last_n")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW: learning rate, weight decay, linear warm-up steps."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"method.optimizer.lr must be a positive number, got {self.lr!r}")
        if not (
            isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise ConfigError(f"method.optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ConfigError(f"method.optimizer.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


@dataclass(frozen=True)
class MethodConfig:
    """A checked method config (:func:`method_config`)."""

    name: str
    targets: str
    curriculum: bool
    loss: LossConfig | HysacLossConfig
    trainable: TrainableConfig
    optimizer: OptimizerConfig
    neighbours: NeighbourConfig | None = None
    extra_pool: str | None = None
    hyperbolic: HyperbolicConfig | None = None  # HySAC only
    # the IVF-PQ index of an embedded extra pool (a folder of embedding shards)
    pool_index: PoolIndexConfig | None = None
    # adversarial safety fine-tuning (off unless method.adversarial.enabled)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    # the checked config as written (a plain dict): what checkpoints and model cards record
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_hyperbolic(self) -> bool:
        return self.hyperbolic is not None

    @property
    def needs_cache(self) -> bool:
        """Whether training needs the frozen-embedding cache (and targets): not for HySAC."""
        return self.targets != "none"


def _section(method: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = method.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"method.{key} must be a mapping of options, got {type(value).__name__}")
    return dict(value)


def _known(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"did you mean {where}.{close[0]}? " if close else ""
        raise ConfigError(f"{where}: unknown keys {unknown}; {hint}expected some of {sorted(allowed)}")


def method_config(method: Mapping[str, Any]) -> MethodConfig:
    """Check a method config (a plain dict, as the YAML presets hold it) and build its pieces;
    :class:`ConfigError` names the first wrong key."""
    allowed = {
        "name",
        "targets",
        "neighbours",
        "curriculum",
        "loss",
        "trainable",
        "optimizer",
        "hyperbolic",
        "adversarial",
    }
    _known(dict(method), allowed, "method")
    name = method.get("name")
    if name not in METHOD_NAMES:
        raise ConfigError(f"method.name: unknown method {name!r}; expected one of {METHOD_NAMES}")
    targets = method.get("targets")
    if targets not in TARGET_KINDS:
        raise ConfigError(f"method.targets must be one of {TARGET_KINDS}, got {targets!r}")
    hyperbolic_cfg = None
    if name == "hysac":
        if targets != "none":
            raise ConfigError(f"method.targets must be none for HySAC (it redirects nothing), got {targets!r}")
        try:
            hyperbolic_cfg = HyperbolicConfig.from_mapping(_section(method, "hyperbolic"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"method.hyperbolic: {e}") from None
    else:
        if targets == "none":
            raise ConfigError(f"method.targets=none is HySAC's; {name} needs neighbours or paired")
        if method.get("hyperbolic") is not None:
            raise ConfigError(f"method.hyperbolic: only method hysac has a hyperbolic section, not {name}")
    curriculum = method.get("curriculum", False)
    if not isinstance(curriculum, bool):
        raise ConfigError(f"method.curriculum must be true or false, got {curriculum!r}")
    if curriculum and targets == "none":
        raise ConfigError("method.curriculum orders redirection pairs by difficulty: HySAC has none; set it false")

    try:
        loss = HysacLossConfig.from_method(method) if name == "hysac" else LossConfig.from_method(method)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method.loss: {e}") from None

    trainable = _section(method, "trainable")
    _known(trainable, {f.name for f in fields(TrainableConfig)}, "method.trainable")
    trainable["towers"] = tuple(trainable.get("towers", TOWERS) or ())
    trainable["lora_targets"] = tuple(trainable.get("lora_targets", LORA_TARGETS) or ())
    trainable_cfg = TrainableConfig(**trainable)
    if trainable_cfg.mode not in TRAINABLE_MODES:
        raise ConfigError(f"method.trainable.mode must be one of {TRAINABLE_MODES}, got {trainable_cfg.mode!r}")
    if not trainable_cfg.towers or set(trainable_cfg.towers) - set(TOWERS):
        raise ConfigError(
            f"method.trainable.towers must be a non-empty subset of {list(TOWERS)}, got {list(trainable_cfg.towers)}"
        )
    if set(trainable_cfg.lora_targets) - set(LORA_TARGETS):
        raise ConfigError(
            f"method.trainable.lora_targets must be some of {list(LORA_TARGETS)}, got {list(trainable_cfg.lora_targets)}"
        )
    for key in ("lora_r", "last_n_blocks"):
        value = getattr(trainable_cfg, key)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"method.trainable.{key} must be an integer >= 1, got {value!r}")
    if not (isinstance(trainable_cfg.lora_alpha, (int, float)) and trainable_cfg.lora_alpha > 0):
        raise ConfigError(f"method.trainable.lora_alpha must be > 0, got {trainable_cfg.lora_alpha!r}")

    optimizer = _section(method, "optimizer")
    _known(optimizer, {f.name for f in fields(OptimizerConfig)}, "method.optimizer")
    optimizer_cfg = OptimizerConfig(**optimizer)

    neighbours_cfg, extra_pool, pool_index_cfg = None, None, None
    if targets == "neighbours":
        section = _section(method, "neighbours")
        if not section:
            raise ConfigError("method.targets=neighbours needs a method.neighbours section")
        extra_pool = section.pop("extra_pool", None)
        pool_index = _section(section, "pool_index")
        section.pop("pool_index", None)
        _known(pool_index, {f.name for f in fields(PoolIndexConfig)}, "method.neighbours.pool_index")
        try:
            pool_index_cfg = PoolIndexConfig(**pool_index)
        except NeighbourError as e:
            raise ConfigError(f"method.neighbours.pool_index: {e}") from None
        _known(section, {f.name for f in fields(NeighbourConfig)}, "method.neighbours")
        try:
            neighbours_cfg = NeighbourConfig(**section)
        except NeighbourError as e:
            raise ConfigError(f"method.neighbours: {e}") from None
        except TypeError as e:
            raise ConfigError(f"method.neighbours: {e}") from None
    adversarial_cfg = AdversarialConfig.of(_section(method, "adversarial"))
    return MethodConfig(
        name,
        targets,
        curriculum,
        loss,
        trainable_cfg,
        optimizer_cfg,
        neighbours_cfg,
        extra_pool,
        hyperbolic_cfg,
        pool_index_cfg,
        adversarial_cfg,
        source=copy.deepcopy(dict(method)),
    )

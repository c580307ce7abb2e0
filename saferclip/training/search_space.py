"""A hyperparameter search space read from config (``conf/hparams_search/<method>.yaml``).

Each parameter has a name (what the search calls it), the training-config keys it sets (one
value may set several keys, e.g. both live-term weights), a type and its range:

    lr:       {keys: [method.optimizer.lr], type: float, low: 3.0e-5, high: 1.0e-3, log: true}
    trainable: {keys: [method.trainable.mode], type: categorical, choices: [lora, full]}
    lora_r:   {keys: [method.trainable.lora_r, method.trainable.lora_alpha], type: categorical,
               choices: [8, 16, 32], when: {trainable: lora}}

``when`` makes a parameter conditional: it is sampled only when the named earlier parameters
took the given values (a LoRA rank means nothing for full fine-tuning). A trial's values
become Hydra overrides of the training config (:func:`overrides_of`), so a trial is exactly
the run ``saferclip-train <base overrides> <trial overrides>`` would make.

The sampler is duck-typed (anything with Optuna's ``suggest_float`` / ``suggest_int`` /
``suggest_categorical``), so this module imports neither Optuna nor Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class SearchParam:
    name: str
    keys: tuple[str, ...]
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: Mapping[str, Any] = field(default_factory=dict)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter is sampled, given the values sampled before it."""
        return all(name in values and values[name] == value for name, value in self.when.items())

    def suggest(self, trial: Any) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def parse_search_space(space: Mapping[str, Any], where: str = "hparams_search.space") -> list[SearchParam]:
    """The parameters of ``space`` in their written order, checked: a one-line ConfigError names
    the parameter and what was expected."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            f"{where} must be a non-empty mapping of parameter name -> {{keys, type, ...}}, got {space!r}"
        )
    params: list[SearchParam] = []
    for name, spec in space.items():
        at = f"{where}.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{at} must be a mapping with keys, type and a range or choices, got {spec!r}")
        unknown = set(spec) - {"keys", "type", "low", "high", "log", "choices", "when"}
        if unknown:
            raise ConfigError(
                f"{at}: unknown field(s) {sorted(unknown)}; expected keys, type, low, high, log, choices, when"
            )
        keys = spec.get("keys")
        if isinstance(keys, str):
            keys = [keys]
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(
                f"{at}.keys must be a list of training-config keys (e.g. [method.optimizer.lr]), got {keys!r}"
            )
        kind = spec.get("type")
        if kind not in TYPES:
            raise ConfigError(f"{at}.type must be one of {list(TYPES)}, got {kind!r}")
        when = spec.get("when") or {}
        if not isinstance(when, Mapping):
            raise ConfigError(f"{at}.when must map an earlier parameter to a value, got {when!r}")
        earlier = {p.name for p in params}
        for other in when:
            if other not in earlier:
                raise ConfigError(f"{at}.when names {other!r}, which is not a parameter written before {name!r}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{at}.log must be true or false, got {log!r}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) < 1:
                raise ConfigError(f"{at}.choices must be a non-empty list, got {choices!r}")
            params.append(SearchParam(name, tuple(keys), kind, choices=tuple(choices), when=dict(when)))
            continue
        low, high = spec.get("low"), spec.get("high")
        for bound, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{at}.{bound} must be a number, got {value!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{at}: an int parameter needs integer bounds, got [{low}, {high}]")
        if not low < high:
            raise ConfigError(f"{at}: low must be below high, got [{low}, {high}]")
        if log and low <= 0:
            raise ConfigError(f"{at}: a log-scale range must be positive, got [{low}, {high}]")
        params.append(SearchParam(name, tuple(keys), kind, low=float(low), high=float(high), log=log, when=dict(when)))
    return params


def sample(trial: Any, params: Sequence[SearchParam]) -> dict[str, Any]:
    """One value per active parameter, drawn from ``trial`` in the written order."""
    values: dict[str, Any] = {}
    for param in params:
        if param.active(values):
            values[param.name] = param.suggest(trial)
    return values


def override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back to the same type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def overrides_of(params: Sequence[SearchParam], values: Mapping[str, Any]) -> list[str]:
    """Hydra overrides (``key=value``) setting every key of each sampled parameter."""
    by_name = {p.name: p for p in params}
    unknown = set(values) - set(by_name)
    if unknown:
        raise ConfigError(f"values for unknown search parameter(s) {sorted(unknown)}; the space has {sorted(by_name)}")
    return [f"{key}={override_value(values[p.name])}" for p in params if p.name in values for key in p.keys]

"""What the model card takes from a run folder besides the model: its config and its
model selection.

* :func:`read_run_config` — the run's config as training wrote it, every interpolation
  resolved (``config_resolved.yaml``, :func:`saferclip.app.engine.fit.write_resolved_config`);
  :func:`training_data_card` makes the card's "Training data" section of its ``data``;
* :func:`exported_epoch_record` — the exported epoch and its validation figures, from the
  run's ``selection.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..model.trained import RESOLVED_CONFIG, RUN_CONFIG, SELECTION_FILE
from .card import yaml_lines

log = logging.getLogger(__name__)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's config from its ``config_resolved.yaml``; None when the folder records no
    config (or an unreadable one: the card then omits the training data).

    Raises:
        ConfigError: the folder has only Hydra's unresolved ``.hydra/config.yaml`` (a run
            trained before saferclip-train wrote the resolved copy); the message says how
            to give it one.
    """
    run_dir = Path(run_dir)
    path = run_dir / RESOLVED_CONFIG
    if not path.is_file():
        if (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(
                f"{run_dir}: no {RESOLVED_CONFIG} (runs trained before saferclip-train wrote one); "
                f"copy its Hydra config there (cp {run_dir / RUN_CONFIG} {path}) and export again"
            )
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable run config, the model card omits the training data (%s)", path, e)
        return None
    if not isinstance(cfg, Mapping):
        return None
    return _resolve_left_references(cfg, path)


def _has_reference(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_has_reference(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_reference(v) for v in value)
    return isinstance(value, str) and "${" in value


def _resolve_left_references(cfg: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Training writes the config unresolved when one value fails to resolve (an unused
    section pointing at an unset path), and a Hydra config copied in by hand is unresolved
    too. Each top-level section that still holds ``${…}`` references is resolved here with
    the config tree's resolvers (:mod:`saferclip.config_resolvers`) and OmegaConf's
    ``oc.env``; one that does not resolve outside the training run (``${hydra:…}``) is kept
    as written, with a warning, rather than failing the export."""
    out = dict(cfg)
    pending = [key for key, value in cfg.items() if _has_reference(value)]
    if not pending:
        return out
    # imported here only: a resolved run (every run training wrote whole) exports without
    # loading any config library (saferclip-export stays light; tests/test_hf_export.py)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..config_resolvers import register_location_resolvers

    register_location_resolvers()
    try:
        conf = OmegaConf.create(out)
    except OmegaConfBaseException as e:  # a value OmegaConf cannot hold (a YAML date)
        log.warning("%s: kept as written, references unresolved (%s)", path, str(e).splitlines()[0])
        return out
    kept = []
    for key in pending:
        try:
            value = OmegaConf.select(conf, str(key), throw_on_missing=False)
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except (OmegaConfBaseException, ValueError) as e:
            kept.append(f"{key} ({str(e).splitlines()[0]})")
    if kept:
        log.warning("%s: kept as written, references that do not resolve here: %s", path, "; ".join(kept))
    return out


def training_data_card(data: Mapping[str, Any]) -> str:
    """The model card's "Training data" section from a run's ``data`` config."""
    lines = []
    name = data.get("name", "not recorded")
    what = f"`{name}`"
    if data.get("make_toy") or name == "toy":
        what += (
            f" — saferclip's procedurally generated toy world (size `{data.get('toy_size', 'default')}`, "
            f"seed {data.get('toy_seed', 0)}); synthetic, not real images or text"
        )
    lines.append(f"- **Data set:** {what}")
    if data.get("mode"):
        lines.append(f"- **Inputs used:** `{data['mode']}` (text, safe_images, full or auto = all that exist)")
    splits = data.get("splits") or {}
    for split in ("train", "validation"):
        spec = splits.get(split)
        if isinstance(spec, Mapping) and spec.get("path"):
            images = f", images under `{spec['image_root']}`" if spec.get("image_root") else ""
            role = "training" if split == "train" else "model selection"
            lines.append(f"- **{split}** ({role}): `{spec['path']}`{images}")
    config = {k: v for k, v in data.items() if k not in ("zeroshot", "nsfw_caps")}  # those are evaluation data
    lines += [
        "",
        "<details><summary>data config of the run</summary>",
        "",
        "```yaml",
        *yaml_lines(config),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def exported_epoch_record(run_dir: str | os.PathLike | None, epoch: int | None) -> dict[str, Any] | None:
    """Which epoch is exported and its validation figures, from the run's ``selection.json``:
    ``{"epoch", "global_step", "metrics", "monitor", "score", "selected_epoch", "matched_safety"}``
    (None when the run has no such file or no record of that epoch). ``selected_epoch`` is the
    epoch the run's checkpoint callback chose; it differs from ``epoch`` when another one is
    exported. ``matched_safety``: the sentence saying which epoch matched safety keeps and
    whether it reached τ (None in a record from before matched safety)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        history = {int(h["epoch"]): h for h in record.get("history", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s: unreadable (%s); the card omits the validation figures", path, e)
        return None
    if epoch is None or int(epoch) not in history:
        return None
    entry = history[int(epoch)]
    monitor = record.get("monitor")
    from ..evaluation.selection import metric_of_monitor  # the evaluation package, only when read

    key = metric_of_monitor(monitor)
    selected = record.get("selected") or {}
    return {
        "epoch": int(epoch),
        "global_step": entry.get("global_step"),
        "metrics": entry.get("metrics", {}),
        "monitor": monitor,
        "score": entry.get("metrics", {}).get(key) if key else None,
        "selected_epoch": selected.get("epoch"),
        "matched_safety": (record.get("matched_safety") or {}).get("note"),
    }


__all__ = ["exported_epoch_record", "read_run_config", "training_data_card"]

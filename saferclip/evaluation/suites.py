"""What the evaluation suites read, loaded from a data config before any model is built.

The data configuration is the training one (``conf/data/*.yaml``, as a plain dict): the ViSU
split comes from ``splits.<split>``, NSFW-Caps from ``nsfw_caps``, the zero-shot tasks from
``zeroshot``. A suite whose data is not configured is skipped and the reason recorded
(:attr:`EvalData.skipped`); data that is configured but broken is an error, raised here,
before any model is built. The analysis reads its inputs through the same loaders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.nsfw_caps import CaptionPairSet, load_nsfw_caps
from ..data.records import QuadrupletSet, ZeroShotTask
from ..data.splits import distractor_images, load_split
from ..data.zeroshot import (
    load_image_folder_task,
    load_torchvision_task,
    load_webdataset_task,
)
from ..errors import ConfigError
from .cost import is_unsafe_task

log = logging.getLogger("saferclip.eval")

SUITES = ("zeroshot", "visu", "nsfw_caps")


@dataclass
class EvalData:
    """The loaded evaluation data, what describes it in reports, and the suites without data."""

    visu: QuadrupletSet | None = None
    visu_distractors: list[Path] | None = None
    nsfw_caps: CaptionPairSet | None = None
    zeroshot: dict[str, ZeroShotTask] = field(default_factory=dict)
    unsafe_tasks: set[str] = field(default_factory=set)
    describe: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def check_suites(suites: Iterable[str]) -> list[str]:
    """``suites`` (a name or names) as a list without repeats; an unknown or empty one is a config error."""
    suites = [suites] if isinstance(suites, str) else list(suites)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError(f"unknown suite(s) {unknown}; expected some of {list(SUITES)}")
    if not suites:
        raise ConfigError(f"no suite to run; expected some of {list(SUITES)}")
    return list(dict.fromkeys(suites))


def _unset(path: Any) -> bool:
    # "${paths.nsfw_caps}/nsfw_caps.csv" with paths.nsfw_caps unset resolves to "None/nsfw_caps.csv"
    return path is None or str(path) == "" or any(part in ("None", "null", "???") for part in Path(str(path)).parts)


def _plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}


def load_eval_data(data_cfg: Mapping[str, Any], suites: Sequence[str], split: str = "test") -> EvalData:
    """Load what the suites need from a data config (see the module docstring)."""
    data = EvalData()
    on_error = data_cfg.get("on_error", "raise")
    if "visu" in suites:
        splits = data_cfg.get("splits") or {}
        if split not in splits:
            data.skipped["visu"] = f"data.splits has no {split!r} split (has: {', '.join(splits) or 'none'})"
        else:
            spec = dict(splits[split])
            path = spec.pop("path", None)
            if _unset(path):
                data.skipped["visu"] = f"data.splits.{split}.path is not set"
            else:
                qset = load_split(data_cfg, split)
                _warn_skips(qset)
                data.visu = qset
                data.visu_distractors = distractor_images(data_cfg, split)
                data.describe["visu"] = {
                    "path": str(path),
                    "split": split,
                    "mode": qset.mode.value,
                    "num_items": len(qset),
                    **_plain(spec),
                }
                if data.visu_distractors:
                    data.describe["visu"]["num_distractor_images"] = len(data.visu_distractors)
    if "nsfw_caps" in suites:
        spec = dict(data_cfg.get("nsfw_caps") or {})
        path = spec.pop("path", None)
        if _unset(path):
            data.skipped["nsfw_caps"] = "data.nsfw_caps.path is not set"
        else:
            pairs = load_nsfw_caps(
                path,
                image_root=None if _unset(spec.get("image_root")) else spec["image_root"],
                nsfw_image_root=None if _unset(spec.get("nsfw_image_root")) else spec["nsfw_image_root"],
                on_error=on_error,
            )
            _warn_skips(pairs)
            data.nsfw_caps = pairs
            data.describe["nsfw_caps"] = {"path": str(path), "num_pairs": len(pairs), **_plain(spec)}
    if "zeroshot" in suites:
        tasks = data_cfg.get("zeroshot") or {}
        if not tasks:
            data.skipped["zeroshot"] = "no zero-shot tasks configured (data.zeroshot is empty)"
        for name, spec in tasks.items():
            task = load_zeroshot_task(name, spec)
            data.zeroshot[name] = task
            if is_unsafe_task(name, spec):
                data.unsafe_tasks.add(name)
            data.describe.setdefault("zeroshot", {})[name] = {
                **_plain(spec),
                "source": task.source,
                "num_images": len(task.samples),
                "num_classes": len(task.classnames),
                "unsafe": name in data.unsafe_tasks,
            }
    return data


def _warn_skips(dataset: Any) -> None:
    skips = getattr(dataset, "skips", None)
    if skips is not None and skips.count:
        log.warning(skips.summary())


ZEROSHOT_KEYS = {
    "folder": {"root", "split", "classnames", "templates", "name"},
    "torchvision": {"name", "root", "templates", "classnames", "split"},
    "webdataset": {"shards", "classnames", "templates", "name"},
}


def load_zeroshot_task(name: str, spec: Mapping[str, Any]) -> ZeroShotTask:
    """One zero-shot task from its config entry: ``{type: folder, root, [split, classnames,
    templates]}``, ``{type: torchvision, name: cifar10, root, templates, [classnames, split]}``
    or ``{type: webdataset, shards, classnames, templates}``; ``unsafe: true`` marks a task on
    unsafe images (default: a name ending in ``_unsafe``)."""
    spec = dict(spec or {})
    kind = spec.pop("type", "folder")
    spec.pop("unsafe", None)
    if kind not in ZEROSHOT_KEYS:
        raise ConfigError(f"data.zeroshot.{name}: unknown type {kind!r}; expected one of {sorted(ZEROSHOT_KEYS)}")
    unknown = sorted(set(spec) - ZEROSHOT_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"data.zeroshot.{name}: unknown keys {unknown} for type {kind}; expected {sorted(ZEROSHOT_KEYS[kind])}"
        )
    try:
        if kind == "folder":
            return load_image_folder_task(
                spec["root"],
                spec.get("split", "test"),
                spec.get("classnames"),
                spec.get("templates"),
                spec.get("name", name),
            )
        if kind == "torchvision":
            return load_torchvision_task(
                spec.get("name", name),
                spec["root"],
                spec["templates"],
                spec.get("classnames"),
                spec.get("split", "test"),
            )
        return load_webdataset_task(spec["shards"], spec["classnames"], spec["templates"], spec.get("name", name))
    except KeyError as e:
        raise ConfigError(f"data.zeroshot.{name}: type {kind} needs {e.args[0]!r}") from None

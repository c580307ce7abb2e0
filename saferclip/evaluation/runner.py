"""Evaluate several models on the configured suites: the engine of ``saferclip-eval`` and of
the main job (original vs Safe-CLIP vs SafeR-CLIP).

The data configuration is the training one (``conf/data/*.yaml``, as a plain dict): the ViSU
split comes from ``splits.<split>``, NSFW-Caps from ``nsfw_caps``, the zero-shot tasks from
``zeroshot``. A suite whose data is not configured is skipped and the reason recorded; data
that is configured but broken is an error, raised before any model is built, and so is a
model that cannot be found or does not match its architecture.

The reference model is evaluated first; its gallery embeddings serve setting (b) of every
other model (a safe encoder querying the original index) and its scores the cost of safety.
Each model is freed before the next is built.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import __version__
from ..data.nsfw_caps import CaptionPairSet, load_nsfw_caps
from ..data.records import QuadrupletSet, ZeroShotTask
from ..data.splits import distractor_images, load_split
from ..data.zeroshot import (
    load_image_folder_task,
    load_torchvision_task,
    load_webdataset_task,
)
from ..errors import ConfigError
from ..model.build import ClipBundle, check_arch, default_base_checkpoint
from ..model.checkpoints import CheckpointError, read_safetensors_metadata, sniff_format
from ..model.trained import is_training_checkpoint, load_model
from ..model.hyperbolic import check_percentile
from ..model.similarity import MODES
from .cost import cost_of_safety, is_unsafe_task
from .hyperbolic import origin_detector_metrics
from .intervals import LEVEL, RESAMPLES, metric_intervals, paired_differences
from .nsfw_caps import embed_nsfw_caps, nsfw_caps_metrics
from .oracle import ORACLE_NAME, oracle_redirection
from .retrieval import embed_visu, visu_metrics
from .showcase import Showcase, load_borderline_lookalikes, showcase_settings
from .zeroshot import evaluate_zeroshot

log = logging.getLogger("saferclip.eval")

SUITES = ("zeroshot", "visu", "nsfw_caps")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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
            raise ConfigError(f"model {name!r}: mode must be one of {list(MODES)} (hyperbolic models only), got {mode!r}")
        return cls(
            spec.get("arch"), None if pretrained in (None, "") else str(pretrained), spec.get("precision") or "fp32", mode, percentile
        )


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


# ----------------------------------------------------------------------------- data
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
                data.describe["visu"] = {"path": str(path), "split": split, "mode": qset.mode.value, "num_items": len(qset), **_plain(spec)}
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
        raise ConfigError(f"data.zeroshot.{name}: unknown keys {unknown} for type {kind}; expected {sorted(ZEROSHOT_KEYS[kind])}")
    try:
        if kind == "folder":
            return load_image_folder_task(
                spec["root"], spec.get("split", "test"), spec.get("classnames"), spec.get("templates"), spec.get("name", name)
            )
        if kind == "torchvision":
            return load_torchvision_task(spec.get("name", name), spec["root"], spec["templates"], spec.get("classnames"), spec.get("split", "test"))
        return load_webdataset_task(spec["shards"], spec["classnames"], spec["templates"], spec.get("name", name))
    except KeyError as e:
        raise ConfigError(f"data.zeroshot.{name}: type {kind} needs {e.args[0]!r}") from None


# ----------------------------------------------------------------------------- models
def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or "\\" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES


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
        if _looks_like_path(spec.pretrained):
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
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        if spec.precision not in dtypes:
            raise ConfigError(f"model {name!r}: precision must be fp32, fp16 or bf16, got {spec.precision!r}")
        bundle.model.to(dtypes[spec.precision])
    return bundle


def radii_at(name: str, bundle: ClipBundle, percentile: float, distances: dict[str, Any]):
    """``bundle``'s geometry in safe mode with its radii at ``percentile`` of the training
    split's safe items' distances from the origin (``distances``: :func:`safe_distances`)."""
    from ..model.hyperbolic import safe_radii

    return bundle.similarity.with_radii(safe_radii(distances, percentile))


def safe_distances(name: str, bundle: ClipBundle, data_cfg: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    from ..model.similarity import LorentzSimilarity
    from .hyperbolic import safe_item_distances

    if not isinstance(bundle.similarity, LorentzSimilarity):
        raise ConfigError(f"model {name!r}: traversal_percentile is for a hyperbolic (HySAC) model; this one is Euclidean")
    return safe_item_distances(bundle, load_split(data_cfg, "train"), **kw)


def toy_world_record(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"pairing", "pair_stats"}`` of a toy world (its manifest's preset and its saved
    ``pair_stats.json``), both None for other data or where the world lacks them."""
    import json

    from ..toyworld.pair_stats import PAIR_STATS_FILE

    out: dict[str, Any] = {"pairing": None, "pair_stats": None}
    root = data_cfg.get("root")
    if not data_cfg.get("make_toy") or not root:
        return out
    for key, name in (("pairing", "manifest.json"), ("pair_stats", PAIR_STATS_FILE)):
        try:
            found = json.loads((Path(root) / name).read_text())
        except (OSError, ValueError):
            continue
        out[key] = found.get("pairing") if key == "pairing" else found
    return out


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the run
def evaluate_models(
    models: Mapping[str, ModelSpec | Mapping[str, Any]],
    data_cfg: Mapping[str, Any],
    suites: Iterable[str] = SUITES,
    reference: str | None = "original",
    split: str = "test",
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    config: Mapping[str, Any] | None = None,
    oracle: str | None = None,
    showcase: bool | Mapping[str, Any] | None = True,
) -> dict[str, Any]:
    """Evaluate ``models`` on ``suites`` and compute the cost of safety against ``reference``.

    Args:
        models: name -> :class:`ModelSpec` or ``{arch, pretrained[, precision]}``.
        data_cfg: a resolved data config (``conf/data/*.yaml`` as a dict).
        reference: the name of the original model among ``models`` (None: no setting-(b)
            galleries and no cost of safety).
        split: the ViSU split (zero-shot tasks use their own ``split``, default test).
        config: the resolved configuration of the run, stored with the results.
        oracle: ``text`` or ``joint`` adds the row ``"oracle redirection"``
            (:func:`saferclip.evaluation.oracle.oracle_redirection`): the reference model's
            test embeddings with every unsafe item replaced by its training target's frozen
            embeddings, the bound of what redirection alone can do. Needs the reference and
            the ``train`` split of ``data_cfg``.
        showcase: the report's retrieval galleries (:mod:`saferclip.evaluation.showcase`):
            True (defaults), False / None (none), or ``{queries, k, seed, borderline}``: for
            ``queries`` seeded test items (seed: the evaluation's), each model's top ``k`` on
            the ViSU split, and, with ``borderline`` and the toy world's borderline split, on
            borderline-safe captions.

    Returns:
        ``{"meta", "data", "skipped", "models", "results"[, "showcase"]}``: ``results[model][suite]`` holds
        :func:`evaluate_visu` / :func:`evaluate_nsfw_caps` results, ``{task: zero-shot
        result}`` under ``zeroshot``, and :func:`cost_of_safety` under ``cost``.
    """
    suites = check_suites(suites)
    if not models:
        raise ConfigError("no model to evaluate")
    specs = {name: ModelSpec.of(name, spec) for name, spec in models.items()}
    if reference is not None and reference not in specs:
        raise ConfigError(f"reference model {reference!r} is not among the models {list(specs)}; add it or set reference=null")
    if oracle is not None and reference is None:
        raise ConfigError("the oracle row needs a reference model")
    for name, spec in specs.items():
        check_model(name, spec)
    gallery_settings = showcase_settings(showcase, seed)
    data = load_eval_data(data_cfg, suites, split)  # before any model: broken data fails fast
    gallery = Showcase(gallery_settings) if gallery_settings and data.visu is not None else None
    borderline = None
    if gallery is not None and gallery_settings["borderline"] and data.visu.mode.has_unsafe_images:
        borderline = load_borderline_lookalikes(data_cfg, split)
    for suite, why in data.skipped.items():
        log.warning("suite %s skipped: %s", suite, why)

    order = ([reference] if reference is not None else []) + [n for n in specs if n != reference]
    results: dict[str, dict[str, Any]] = {}
    described: dict[str, dict[str, Any]] = {}
    ref_visu = ref_nsfw = None
    reuse: dict[str, Any] = {}  # what the previous model encoded, for the same weights in another mode
    for name in order:
        spec = specs[name]
        log.info("evaluating %s (%s, %s)", name, spec.arch or "arch from the file", spec.pretrained or "random init")
        started = time.perf_counter()
        bundle = build_model(name, spec, device, seed)
        kw = dict(batch_size=batch_size, num_workers=num_workers, progress=progress)
        # the same weights in another mode (HySAC safe / moderation, other safe radii): the
        # embeddings are the same, only the scoring differs, so they are encoded once
        weights = (spec.arch, spec.pretrained, spec.precision)
        if weights != reuse.get("weights"):
            reuse.clear()
            reuse["weights"] = weights
        if spec.traversal_percentile is not None:
            if "distances" not in reuse:
                reuse["distances"] = safe_distances(name, bundle, data_cfg, **kw)
            bundle.similarity = radii_at(name, bundle, spec.traversal_percentile, reuse["distances"])
        out: dict[str, Any] = {}
        if data.zeroshot:
            out["zeroshot"] = {t: evaluate_zeroshot(bundle, task, name=t, **kw) for t, task in data.zeroshot.items()}
        if data.visu is not None:
            if "visu" not in reuse:
                reuse["visu"] = embed_visu(bundle, data.visu, distractors=data.visu_distractors, **kw)
            emb = replace(reuse["visu"], similarity=bundle.similarity)
            if name == reference:
                ref_visu = emb
            out["visu"] = visu_metrics(emb, ref_visu)
            out["visu"].update(origin_detector_metrics(emb))  # a hyperbolic model's own detector
            if gallery is not None:
                gallery.add(name, "ViSU", data.visu, emb)
                if borderline is not None:
                    gallery.add(name, "Borderline", borderline, embed_visu(bundle, borderline, **kw), "borderline")
            if name == reference and oracle is not None:
                started_oracle = time.perf_counter()
                train = load_split(data_cfg, "train")
                results[ORACLE_NAME] = {"visu": oracle_redirection(bundle, train, emb, mode=oracle, **kw)}
                described[ORACLE_NAME] = {
                    "arch": bundle.arch,
                    "pretrained": f"frozen targets of {name!r} ({oracle} neighbours in {train.source})",
                    "source": bundle.source,
                    "seconds": round(time.perf_counter() - started_oracle, 2),
                }
        if data.nsfw_caps is not None:
            if "nsfw_caps" not in reuse:
                reuse["nsfw_caps"] = embed_nsfw_caps(bundle, data.nsfw_caps, **kw)
            emb = replace(reuse["nsfw_caps"], similarity=bundle.similarity)
            if name == reference:
                ref_nsfw = emb
            out["nsfw_caps"] = nsfw_caps_metrics(emb, ref_nsfw)
        described[name] = {
            **asdict(spec),
            "similarity": bundle.similarity.label,
            "arch": bundle.arch,
            "source": bundle.source,
            "seconds": round(time.perf_counter() - started, 2),
        }
        results[name] = out
        del bundle  # one model in memory at a time
        _release_memory()
    if reference is not None:
        for name in order:
            results[name]["cost"] = cost_of_safety(results[name], results[reference], data.unsafe_tasks)
    # how sure each figure is: bootstrap intervals over the test queries, and every pair of
    # evaluated models compared on the same queries (saferclip.evaluation.intervals)
    intervals = metric_intervals(results, reference, sorted(data.unsafe_tasks), seed)
    compared = [n for n in specs if n != reference]
    differences = paired_differences([results], compared, reference, sorted(data.unsafe_tasks), seed=seed)
    evaluation = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "saferclip_version": __version__,
            "split": split,
            "seed": seed,
            "batch_size": batch_size,
            "device": str(device),
            "suites": suites,
            "reference": reference,
            "config": dict(config) if config is not None else None,
            # the toy world's generator seed (None: real data); tuning uses world 0 only
            "world": int(data_cfg.get("toy_seed", 0)) if data_cfg.get("make_toy") else None,
            # how its pairs were made and how close they are (saved with the world by
            # saferclip-make-toy and the main job; None when absent)
            **toy_world_record(data_cfg),
            "intervals": f"{int(100 * LEVEL)}% percentile bootstrap over the test queries, {RESAMPLES} resamples",
        },
        "data": data.describe,
        "skipped": data.skipped,
        "models": {n: described[n] for n in [*specs, *([ORACLE_NAME] if ORACLE_NAME in results else [])]},
        "results": {n: results[n] for n in [*specs, *([ORACLE_NAME] if ORACLE_NAME in results else [])]},
        "intervals": intervals,
        "differences": differences,
    }
    if gallery is not None and gallery.result() is not None:
        evaluation["showcase"] = gallery.result()
    return evaluation

"""``saferclip-attack``'s engine: the attack suite against several models (:func:`attack_models`;
report: :func:`~.report.write_attack_report`).

Per model, on the evaluation split (the toy world's test split: held-out scene × concept
combinations): its safety monitor is fitted (:func:`~.monitor.fit_monitor`: training split for
the head and the bank, clean safe validation inputs for the threshold) and measured on clean
test inputs; :class:`~.suite.ModelSuite` runs every attack × budget, oblivious and against the
monitor; the coverage monitor (:mod:`.coverage`, the baseline) is fitted and shown the same
successful attacks. Items are sampled with the seed, the same for every model, so the methods
are attacked on the same inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.detector import sample
from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from ..evaluation.encode import encode_image_files, encode_texts
from ..model.build import weights_fingerprint
from ..model.catalogue import ModelSpec, build_model, check_model
from ..toyworld.scene import Scene, make_tiles, render
from .coverage import calibrate, profile, save_monitors, watched_inputs, watched_pixels, watched_with_groups
from .measures import rate_interval
from .monitor import SafetyMonitor, fit_monitor, monitored
from .settings import AttackSettings, CoverageSettings
from .suite import Galleries, ModelSuite

log = logging.getLogger("saferclip.attack")

UNSEEN_GRAMMAR = (
    "shape: {shape} | colour: {colour} | size: {size} | background: {background} | object: {obj}",
    "{obj} {background} {shape} {colour} {size}",
)


# ----------------------------------------------------------------------------- inputs
@dataclass
class SplitInputs:
    """A split's distinct captions and images by kind, and each unsafe caption's scene."""

    safe_captions: list[str]
    unsafe_captions: list[str]
    safe_images: list[str]
    unsafe_images: list[str]
    scenes: dict[str, dict]  # unsafe caption -> its scene (the text attacks' slots)

    @classmethod
    def of(cls, qset: QuadrupletSet) -> SplitInputs:
        d = lambda xs: list(dict.fromkeys(xs))  # noqa: E731 - distinct, first-seen order
        scenes = {
            q.unsafe_caption: dict(q.meta["nsfw_scene"]) for q in qset if isinstance(q.meta.get("nsfw_scene"), Mapping)
        }
        return cls(
            d(qset.safe_captions),
            d(qset.unsafe_captions),
            d(str(q.safe_image) for q in qset),
            d(str(q.unsafe_image) for q in qset),
            scenes,
        )


def load_attack_split(data_cfg: Mapping[str, Any], split: str) -> QuadrupletSet:
    qset = load_split(data_cfg, split)
    if not qset.mode.has_unsafe_images:
        raise ConfigError(
            f"{qset.source}: the attacks need safe and unsafe images (split {split!r} has mode {qset.mode.value})"
        )
    return qset


def ood_inputs(test: SplitInputs, s: CoverageSettings, seed: int, shape: tuple[int, int]) -> dict[str, Any]:
    """Out-of-distribution inputs: uniform-noise images, the test split's unsafe scenes drawn
    with another generator seed's object tiles, and captions of its scenes in an unseen grammar."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand((s.ood_items, 3, *shape), generator=g)
    tiles = make_tiles(s.style_seed)
    scenes = list(test.scenes.values())[: s.ood_items]
    rng = np.random.default_rng(seed)
    style = [
        torch.from_numpy(render(Scene.from_dict(sc), rng, tile=tiles[sc["obj"]])).permute(2, 0, 1).float() / 255
        for sc in scenes
    ]
    captions = [
        UNSEEN_GRAMMAR[i % len(UNSEEN_GRAMMAR)].format(
            **{k: sc[k] for k in ("shape", "colour", "size", "background", "obj")}
        )
        for i, sc in enumerate(scenes)
    ]
    return {
        "noise_images": noise,
        "style_images": torch.stack(style) if style else torch.empty(0, 3, *shape),
        "grammar_captions": captions,
    }


def _pixels_shape(bundle) -> tuple[int, int]:
    size = bundle.model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


# ----------------------------------------------------------------------------- the safety monitor
def fit_monitors(
    bundle, data_cfg: Mapping[str, Any], settings: AttackSettings, seed: int, batch_size: int
) -> dict[str, SafetyMonitor]:
    """The model's safety monitor per tower (:func:`~.monitor.fit_monitor`): the head from
    labelled training inputs, the bank from the training split embedded by the model, the
    threshold from clean safe validation inputs."""
    s = settings.monitor
    train, validation = (
        SplitInputs.of(load_split(data_cfg, "train")),
        SplitInputs.of(load_split(data_cfg, "validation")),
    )
    pick = lambda items, n, k: sample(items, n, seed + k)  # noqa: E731
    bank = monitor_bank(bundle, train, s.bank_items, seed, batch_size)
    monitors = {}
    for tower, (safe, unsafe, clean) in {
        "text": (train.safe_captions, train.unsafe_captions, validation.safe_captions),
        "image": (train.safe_images, train.unsafe_images, validation.safe_images),
    }.items():
        labelled = (pick(safe, s.labelled_items, 5), pick(unsafe, s.labelled_items, 6))
        monitors[tower] = fit_monitor(
            bundle,
            tower,
            labelled,
            bank,
            pick(clean, s.validation_items, 7),
            s.signals,
            s.k,
            s.target_fpr,
            seed,
            batch_size,
            s.head_layers,
        )
    return monitors


def monitor_bank(
    bundle, train: SplitInputs, items: int, seed: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The monitors' bank: ``items`` of each kind of the training split (safe / unsafe captions /
    images) embedded by the model; (embeddings, unsafe, caption) per row."""
    parts = [
        (encode_texts(bundle, sample(train.safe_captions, items, seed + 1), batch_size), False, True),
        (encode_texts(bundle, sample(train.unsafe_captions, items, seed + 2), batch_size), True, True),
        (encode_image_files(bundle, sample(train.safe_images, items, seed + 3), batch_size), False, False),
        (encode_image_files(bundle, sample(train.unsafe_images, items, seed + 4), batch_size), True, False),
    ]
    flags = lambda e, v: torch.full((len(e),), v, dtype=torch.bool)  # noqa: E731
    return (
        torch.cat([e for e, _, _ in parts]),
        torch.cat([flags(e, u) for e, u, _ in parts]),
        torch.cat([flags(e, t) for e, _, t in parts]),
    )


def monitor_clean(bundle, monitors: Mapping[str, SafetyMonitor], test: SplitInputs, batch_size: int) -> dict[str, Any]:
    """Each monitor on the clean test inputs: false positives (safe flagged), unsafe inputs flagged."""
    out = {}
    for tower, monitor in monitors.items():
        encode = (
            (lambda xs: encode_texts(bundle, xs, batch_size))
            if tower == "text"
            else (lambda xs: encode_image_files(bundle, xs, batch_size))
        )
        run = monitored(monitor, bundle.model, encode)
        safe, unsafe = (
            (test.safe_captions, test.unsafe_captions) if tower == "text" else (test.safe_images, test.unsafe_images)
        )
        with torch.no_grad():
            out[tower] = {
                **monitor.describe(),
                "clean_safe_flagged": rate_interval(run(safe)[1] > monitor.threshold),
                "clean_unsafe_flagged": rate_interval(run(unsafe)[1] > monitor.threshold),
            }
    return out


# ----------------------------------------------------------------------------- one model
def attack_model(
    name: str,
    bundle,
    data_cfg: Mapping[str, Any],
    settings: AttackSettings,
    split: str,
    seed: int,
    batch_size: int,
    monitors_dir: Path | None,
    force: bool,
) -> dict[str, Any]:
    qset = load_attack_split(data_cfg, split)
    check_layers(bundle, settings)  # a block the model does not have fails before any work
    out: dict[str, Any] = {"model": name, "similarity": bundle.similarity.label}
    monitors: dict[str, SafetyMonitor] = {}
    if "monitor" in settings.parts:
        t0 = time.perf_counter()
        monitors = fit_monitors(bundle, data_cfg, settings, seed, batch_size)
        out["monitor"] = monitor_clean(bundle, monitors, SplitInputs.of(qset), batch_size)
        out["monitor_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    suite = ModelSuite(bundle, Galleries.of(bundle, list(qset), batch_size), settings, seed, batch_size, monitors)
    out.update(suite.run())
    out["attack_seconds"] = time.perf_counter() - t0
    if "coverage" in settings.parts:
        t0 = time.perf_counter()
        out["coverage"] = coverage_part(
            name,
            bundle,
            data_cfg,
            settings.coverage,
            seed,
            batch_size,
            SplitInputs.of(qset),
            suite.adversarial,
            suite.adversarial_texts,
            monitors_dir,
            force,
        )
        out["coverage_seconds"] = time.perf_counter() - t0
    return out


def coverage_part(
    name,
    bundle,
    data_cfg,
    s: CoverageSettings,
    seed,
    batch_size,
    test: SplitInputs,
    adversarial: Mapping[str, torch.Tensor],
    successful_text: Sequence[str],
    monitors_dir: Path | None,
    force: bool,
) -> dict:
    """The baseline: the coverage monitor per tower, shown clean test inputs, OOD inputs and the
    successful attacks at the headline budget (oblivious)."""
    train, validation = (
        SplitInputs.of(load_split(data_cfg, "train")),
        SplitInputs.of(load_split(data_cfg, "validation")),
    )
    pools = {
        "text": (
            train.safe_captions + train.unsafe_captions,
            validation.safe_captions + validation.unsafe_captions,
            test.safe_captions + test.unsafe_captions,
        ),
        "image": (
            train.safe_images + train.unsafe_images,
            validation.safe_images + validation.unsafe_images,
            test.safe_images + test.unsafe_images,
        ),
    }
    ood = ood_inputs(test, s, seed, _pixels_shape(bundle))
    monitors, results = {}, {}
    for tower, (train_pool, val_pool, test_pool) in pools.items():
        layers = _layers(bundle, tower, s.layers, "attack.coverage.layers")
        x_train, groups = watched_with_groups(
            bundle, tower, sample(train_pool, s.train_items, seed), layers, batch_size
        )
        monitor = profile(x_train, groups, tower, layers, s.sections, s.top_k)
        calibrate(
            monitor,
            watched_inputs(bundle, tower, sample(val_pool, s.validation_items, seed + 1), layers, batch_size),
            s.target_fpr,
            seed,
        )
        monitor.model = {
            "name": name,
            "source": str(bundle.source),
            "arch": bundle.arch,
            "weights_fingerprint": weights_fingerprint(bundle.model),
        }
        monitors[tower] = monitor
        r: dict[str, Any] = {
            "threshold": monitor.threshold,
            "profile_bytes": monitor.nbytes(),
            "num_neurons": len(monitor.low),
        }
        r["clean_test"] = rate_interval(monitor.flags(watched_inputs(bundle, tower, test_pool, layers, batch_size)))
        if tower == "image":
            for key, pixels in adversarial.items():
                r[f"attack {key}"] = rate_interval(
                    monitor.flags(watched_pixels(bundle, pixels, layers, batch_size))
                    if len(pixels)
                    else torch.zeros(0, dtype=torch.bool)
                )
            for key in ("noise_images", "style_images"):
                r[f"ood {key}"] = rate_interval(monitor.flags(watched_pixels(bundle, ood[key], layers, batch_size)))
        else:
            r["ood grammar_captions"] = rate_interval(
                monitor.flags(watched_inputs(bundle, "text", ood["grammar_captions"], layers, batch_size))
            )
            texts = list(successful_text)
            r["attack text"] = rate_interval(
                monitor.flags(watched_inputs(bundle, "text", texts, layers, batch_size))
                if texts
                else torch.zeros(0, dtype=torch.bool)
            )
        results[tower] = r
    if s.save and monitors_dir is not None:
        path = save_monitors(
            Path(monitors_dir) / f"{name}.safetensors", monitors, force=force, info={"model_name": name}
        )
        results["file"] = str(path)
    return results


def _layers(bundle, tower: str, layers: Sequence[int] | None, key: str) -> list[int]:
    """The blocks ``layers`` of ``tower`` (None: all); one that the tower lacks is a one-line
    error naming the config ``key``."""
    from ..analysis.heads import tower_blocks

    count = len(tower_blocks(bundle.model, tower))
    chosen = list(range(count)) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise ConfigError(f"{key}: {bad} out of range; the {tower} tower has {count} blocks (0..{count - 1})")
    return chosen


def check_layers(bundle, settings: AttackSettings) -> None:
    """The block lists of the parts that run (coverage layers, the monitor head's blocks), against
    this model's towers: checked when the model is built, before its first attack."""
    for tower in ("text", "image"):
        if "coverage" in settings.parts:
            _layers(bundle, tower, settings.coverage.layers, "attack.coverage.layers")
        if "monitor" in settings.parts and settings.monitor.head_layers is not None:
            _layers(bundle, tower, settings.monitor.head_layers, "attack.monitor.head_layers")


# ----------------------------------------------------------------------------- several models
def attack_models(
    models: Mapping[str, Mapping[str, Any]],
    data_cfg: Mapping[str, Any],
    settings: AttackSettings,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    monitors_dir: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Attack each model in turn (checked first, built one at a time)."""
    specs = {name: ModelSpec.of(name, spec) for name, spec in models.items()}
    for name, spec in specs.items():
        check_model(name, spec)
    load_attack_split(data_cfg, split)  # broken data fails before any model is built
    results: dict[str, Any] = {
        "settings": settings.as_dict(),
        "split": split,
        "seed": seed,
        "world": data_cfg.get("toy_seed"),
        "models": {},
    }
    for name, spec in specs.items():
        torch.manual_seed(seed)
        bundle = build_model(name, spec, device, seed)
        log.info("attacking %s", name)
        start = time.perf_counter()
        results["models"][name] = attack_model(
            name,
            bundle,
            data_cfg,
            settings,
            split,
            seed,
            batch_size,
            None if monitors_dir is None else Path(monitors_dir),
            force,
        )
        results["models"][name]["seconds"] = round(time.perf_counter() - start, 1)
        del bundle
    return results

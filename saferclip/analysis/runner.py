"""Analyse several models: the engine of ``saferclip-analyze`` (and of ``saferclip-eval``'s
``analysis.parts``).

Three parts, each optional (``parts``):

* ``detector`` — per model and tower, the best single-head detector calibrated on the
  training / validation splits, the two final-embedding baselines, their rates on the test
  split and NSFW-Caps, their false-positive rates on borderline-safe inputs, and (for a
  fine-tuned model) what the *original* model's head sees inside it;
* ``geometry`` — weight change per block, per-layer separability of safe and unsafe inputs,
  the null-space share of the MLP changes, a 2-D picture of the embeddings;
* ``overdefense`` — borderline-safe retrieval, zero-shot and redirection against the original.

The reference (original) model goes first: later models are compared with it. One model is in
memory at a time, plus the reference's weights for the weight change. Everything is
deterministic given the seed. The parts themselves are in :mod:`.parts`, their settings in
:mod:`.settings`, what they read in :mod:`.inputs`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ConfigError
from ..model.catalogue import ModelSpec, build_model, check_model
from . import geometry as geo
from .detector import save_detectors
from .inputs import load_inputs
from .overdefense import compare, redirected_away
from .parts import ActivationCache, detector_part, geometry_part, overdefense_part
from .settings import AnalysisSettings

log = logging.getLogger("saferclip.analyze")


def analyze_models(
    models: Mapping[str, ModelSpec | Mapping[str, Any]],
    data_cfg: Mapping[str, Any],
    settings: AnalysisSettings | Mapping[str, Any] | None = None,
    reference: str | None = "original",
    split: str = "test",
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 0,
    device: str = "cpu",
    detectors_dir: str | Path | None = None,
    force: bool = False,
    config: Mapping[str, Any] | None = None,
    showcase: bool | Mapping[str, Any] | None = True,
) -> dict[str, Any]:
    """Run the analysis ``parts`` on ``models`` (name -> :class:`ModelSpec` or ``{arch,
    pretrained}``); ``reference`` is the original model the others are compared with.
    Detectors are saved as ``<detectors_dir>/<model>.safetensors`` when ``detectors_dir`` is
    given (``force`` replaces existing files).

    ``showcase``: the report's retrieval galleries, from the over-defensiveness part's
    embeddings (as :func:`saferclip.evaluation.runner.evaluate_models`'s ``showcase``).

    Returns ``{"meta", "data", "skipped", "models", "analysis": {model: {part: ...}}[,
    "showcase"]}``.
    """
    settings = settings if isinstance(settings, AnalysisSettings) else AnalysisSettings.of(settings)
    if not settings.parts:
        raise ConfigError("analysis.parts is empty; nothing to analyse")
    if not models:
        raise ConfigError("no model to analyse")
    specs = {n: ModelSpec.of(n, s) for n, s in models.items()}
    if reference is not None and reference not in specs:
        raise ConfigError(
            f"reference model {reference!r} is not among the models {list(specs)}; add it or set reference=null"
        )
    for n, spec in specs.items():
        check_model(n, spec)
    if detectors_dir is not None and "detector" in settings.parts and settings.detector.save and not force:
        for n in specs:
            if (Path(detectors_dir) / f"{n}.safetensors").exists():
                raise FileExistsError(f"{Path(detectors_dir) / f'{n}.safetensors'} exists; pass force to replace it")
    inputs = load_inputs(data_cfg, settings, split)
    from ..evaluation.showcase import Showcase, showcase_settings

    gallery_settings = showcase_settings(showcase, seed)
    gallery = Showcase(gallery_settings) if gallery_settings and "overdefense" in settings.parts else None
    order = ([reference] if reference is not None else []) + [n for n in specs if n != reference]
    results: dict[str, dict[str, Any]] = {}
    described: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    for name in order:
        started = time.perf_counter()
        log.info("analysing %s (%s)", name, specs[name].pretrained or "random init")
        bundle = build_model(name, specs[name], device, seed)
        cache = ActivationCache(bundle, batch_size, num_workers)
        out: dict[str, Any] = {}
        is_ref = name == reference
        timings: dict[str, float] = {}
        if "detector" in settings.parts:
            t = time.perf_counter()
            out["detector"], found = detector_part(
                bundle, cache, inputs, settings.detector, None if is_ref else ref.get("detectors")
            )
            if is_ref:
                ref["detectors"] = found
            if detectors_dir is not None and settings.detector.save and found:
                path = save_detectors(
                    Path(detectors_dir) / f"{name}.safetensors", found, force=force, info={"model_name": name}
                )
                out["detector"]["file"] = str(path)
            timings["detector"] = time.perf_counter() - t
        if "geometry" in settings.parts:
            t = time.perf_counter()
            out["geometry"], emb = geometry_part(
                bundle,
                cache,
                inputs,
                settings.geometry,
                seed,
                None if is_ref else ref.get("state"),
                None if is_ref else ref.get("embeddings"),
                ref.get("basis"),
            )
            if is_ref:
                ref["embeddings"] = emb
                ref["basis"] = geo.pca_basis(torch.cat(list(emb.values())))
                ref["state"] = {k: v.detach().float().cpu().clone() for k, v in bundle.model.state_dict().items()}
            timings["geometry"] = time.perf_counter() - t
        if "overdefense" in settings.parts:
            t = time.perf_counter()
            out["overdefense"], hits = overdefense_part(bundle, inputs, batch_size, num_workers, gallery, name)
            if is_ref:
                ref["overdefense"], ref["hits"] = out["overdefense"], hits
            elif "overdefense" in ref:
                out["overdefense"]["vs_reference"] = compare(out["overdefense"], ref["overdefense"])
                out["overdefense"]["redirected_away"] = {
                    k: redirected_away(v, ref["hits"][k]) for k, v in hits.items() if k in ref["hits"]
                }
            timings["overdefense"] = time.perf_counter() - t
        if "detector" in out and "overdefense" in out:
            out["overdefense"]["detector_flag_rate"] = {
                tower: r["methods"]["head"].get("borderline_flag_rate", {})
                for tower, r in out["detector"].items()
                if isinstance(r, dict) and "methods" in r
            }
        described[name] = {
            "arch": bundle.arch,
            "source": bundle.source,
            "pretrained": specs[name].pretrained,
            "seconds": round(time.perf_counter() - started, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }
        results[name] = out
        del bundle, cache
        gc.collect()
    analysis = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "saferclip_version": __version__,
            "split": split,
            "seed": seed,
            "reference": reference,
            "parts": settings.parts,
            "settings": _settings_dict(settings),
            "config": dict(config) if config is not None else None,
        },
        "data": inputs.describe,
        "skipped": inputs.skipped,
        "models": {n: described[n] for n in specs},
        "analysis": {n: results[n] for n in specs},
    }
    if gallery is not None and gallery.result() is not None:
        analysis["showcase"] = gallery.result()
    return analysis


def _settings_dict(settings: AnalysisSettings) -> dict[str, Any]:
    return asdict(settings)


__all__ = ["analyze_models"]

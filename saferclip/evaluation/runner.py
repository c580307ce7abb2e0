"""Evaluate several models on the configured suites: the engine of ``saferclip-eval`` and of
the main job (original vs Safe-CLIP vs SafeR-CLIP vs HySAC).

The data is loaded first (:mod:`.suites`: broken data fails before any model is built), and
every model is checked (:mod:`saferclip.model.catalogue`: a model that cannot be found or does
not match its architecture fails too). The reference model is evaluated first; its gallery
embeddings serve setting (b) of every other model (a safe encoder querying the original
index) and its scores the cost of safety. Each model is freed before the next is built.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.splits import load_split
from ..errors import ConfigError
from ..model.catalogue import ModelSpec, build_model, check_model
from .cost import cost_of_safety
from .hyperbolic import origin_detector_metrics, radii_at, safe_distances
from .intervals import INTERVALS_NOTE, PER_QUERY, metric_intervals, paired_differences
from .nsfw_caps import embed_nsfw_caps, nsfw_caps_metrics
from .oracle import ORACLE_NAME, oracle_redirection
from .retrieval import embed_visu, visu_metrics
from .showcase import Showcase, load_borderline_lookalikes, showcase_settings
from .suites import SUITES, check_suites, load_eval_data
from .zeroshot import evaluate_zeroshot

log = logging.getLogger("saferclip.eval")


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
        raise ConfigError(
            f"reference model {reference!r} is not among the models {list(specs)}; add it or set reference=null"
        )
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
            detector = origin_detector_metrics(emb)  # a hyperbolic model's own detector
            out["visu"].setdefault(PER_QUERY, {}).update(detector.pop(PER_QUERY, {}))
            out["visu"].update(detector)
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
    # how sure each figure is: exact intervals for shares, the bootstrap for composite figures,
    # and every pair of evaluated models compared on the same queries (saferclip.evaluation.intervals)
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
            "intervals": INTERVALS_NOTE,
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

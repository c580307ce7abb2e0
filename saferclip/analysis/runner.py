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
deterministic given the seed.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import __version__
from ..data.splits import load_split
from ..errors import ConfigError
from ..evaluation.retrieval import embed_visu, visu_metrics
from ..evaluation.runner import (
    ModelSpec,
    build_model,
    check_model,
    load_eval_data,
    load_zeroshot_task,
)
from ..evaluation.zeroshot import evaluate_zeroshot
from ..model.build import ClipBundle, weights_fingerprint
from . import geometry as geo
from .data import (
    TOWERS,
    Borderline,
    calibration_items,
    load_borderline,
    pair_items,
    quadruplet_items,
)
from .detector import (
    DIRECTION_METHODS,
    LabelledItems,
    LinearDetector,
    calibrate_head_detector,
    calibrate_knn,
    calibrate_linear,
    detection_metrics,
    labelled_activations,
    sample,
    save_detectors,
)
from .heads import Activations, activations
from .overdefense import (
    RETRIEVAL_KEYS,
    caption_hits,
    compare,
    redirected_away,
    resemblance,
)
from .stats import stratified_halves

log = logging.getLogger("saferclip.analyze")

PARTS = ("detector", "geometry", "overdefense")


# ----------------------------------------------------------------------------- settings
# the lower bound of the numeric settings (a count of 0 or a negative seed would fail much later)
_MINIMUM = {"per_class": 1, "folds": 2, "knn_k": 1, "projection_items": 2, "seed": 0}


def _check_setting(key: str, annotation: str, value: Any) -> None:
    """``value`` fits the field's annotation (``int``, ``float | None``, ``list[str]``...), else a
    ConfigError naming the key, the value and what was expected."""
    import math

    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return
    base = kinds[0]
    name = key.rsplit(".", 1)[-1]
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= _MINIMUM.get(name, 0)
        expected = f"an integer >= {_MINIMUM.get(name, 0)}"
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    elif base == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif base == "str":
        ok, expected = isinstance(value, str), "a string"
    elif base.startswith("list"):
        ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
    elif base.startswith("dict"):
        ok, expected = isinstance(value, dict), "a mapping"
    else:  # pragma: no cover - a new field type: checked where it is used
        return
    if not ok:
        raise ConfigError(f"{key} must be {expected}{' or null' if 'None' in kinds else ''}, got {value!r}")


@dataclass
class DetectorSettings:
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    per_class: int = 300
    seed: int = 0
    target_fpr: float = 0.05
    direction: str = "logistic"
    strength: float | None = None
    folds: int = 5
    knn_k: int = 5
    towers: list[str] = field(default_factory=lambda: list(TOWERS))
    save: bool = True


@dataclass
class GeometrySettings:
    per_class: int = 200
    energy: float = 0.9
    projection: str = "pca"
    projection_items: int = 150


@dataclass
class OverdefenseSettings:
    borderline: dict[str, Any] | None = None
    zeroshot: dict[str, Any] = field(default_factory=dict)
    ordinary_zeroshot: list[str] = field(default_factory=lambda: ["shape", "colour"])


@dataclass
class AnalysisSettings:
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    geometry: GeometrySettings = field(default_factory=GeometrySettings)
    overdefense: OverdefenseSettings = field(default_factory=OverdefenseSettings)

    @classmethod
    def of(cls, cfg: Mapping[str, Any] | None) -> "AnalysisSettings":
        """From the ``analysis`` config section; unknown keys are an error naming them."""
        cfg = dict(cfg or {})
        parts = cfg.pop("parts", list(PARTS))
        parts = [parts] if isinstance(parts, str) else list(parts or [])
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ConfigError(f"analysis.parts: unknown part(s) {unknown}; expected some of {list(PARTS)}")
        sections = {"detector": DetectorSettings, "geometry": GeometrySettings, "overdefense": OverdefenseSettings}
        built = {}
        for key, kind in sections.items():
            values = dict(cfg.pop(key, None) or {})
            known = set(kind.__dataclass_fields__)
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"analysis.{key}: unknown keys {bad}; expected some of {sorted(known)}")
            for name, value in values.items():
                _check_setting(f"analysis.{key}.{name}", kind.__dataclass_fields__[name].type, value)
            built[key] = kind(**values)
        if cfg:
            raise ConfigError(f"analysis: unknown keys {sorted(cfg)}; expected parts, {', '.join(sections)}")
        d = built["detector"]
        if d.direction not in DIRECTION_METHODS:
            raise ConfigError(f"analysis.detector.direction must be one of {DIRECTION_METHODS}, got {d.direction!r}")
        if not 0 < float(d.target_fpr) < 1:
            raise ConfigError(f"analysis.detector.target_fpr must be in (0, 1), got {d.target_fpr}")
        bad_towers = [t for t in d.towers if t not in TOWERS]
        if bad_towers:
            raise ConfigError(f"analysis.detector.towers: unknown {bad_towers}; expected some of {list(TOWERS)}")
        return cls(list(dict.fromkeys(parts)), built["detector"], built["geometry"], built["overdefense"])


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything the parts read, loaded before any model (broken data fails fast)."""

    test: dict[str, LabelledItems] = field(default_factory=dict)
    test_split: Any = None
    nsfw_caps: dict[str, LabelledItems] = field(default_factory=dict)
    calibration: dict[str, LabelledItems] = field(default_factory=dict)
    borderline: Borderline | None = None
    zeroshot: dict[str, Any] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def load_inputs(data_cfg: Mapping[str, Any], settings: AnalysisSettings, split: str = "test") -> Inputs:
    inputs = Inputs()
    towers = settings.detector.towers
    inputs.test_split = load_split(data_cfg, split)
    inputs.test = quadruplet_items(inputs.test_split, TOWERS)
    inputs.describe["test"] = {"source": inputs.test_split.source, "split": split,
                               **{t: {"safe": len(v.safe), "unsafe": len(v.unsafe)} for t, v in inputs.test.items()}}
    eval_data = load_eval_data(data_cfg, ["nsfw_caps"], split)
    if eval_data.nsfw_caps is not None:
        inputs.nsfw_caps = pair_items(eval_data.nsfw_caps, TOWERS)
        inputs.describe["nsfw_caps"] = {"source": eval_data.nsfw_caps.source,
                                        **{t: {"safe": len(v.safe), "unsafe": len(v.unsafe)} for t, v in inputs.nsfw_caps.items()}}
    else:
        inputs.skipped["nsfw_caps"] = eval_data.skipped.get("nsfw_caps", "not configured")
    if "detector" in settings.parts:
        d = settings.detector
        inputs.calibration = calibration_items(data_cfg, d.splits, int(d.per_class), int(d.seed), towers)
        inputs.describe["calibration"] = {
            t: {"splits": list(d.splits), "safe": len(v.safe), "unsafe": len(v.unsafe), "fingerprint": v.fingerprint(), "source": v.source}
            for t, v in inputs.calibration.items()
        }
    if "detector" in settings.parts or "overdefense" in settings.parts:
        inputs.borderline = load_borderline(settings.overdefense.borderline, data_cfg.get("on_error", "raise"), data_cfg.get("mode", "auto"))
        if inputs.borderline is None:
            inputs.skipped["borderline"] = "analysis.overdefense.borderline is not set (the toy world has one)"
        else:
            inputs.describe["borderline"] = {"source": inputs.borderline.source,
                                             **{k: {t: len(v) for t, v in d.items()} for k, d in inputs.borderline.inputs.items()}}
    if "overdefense" in settings.parts:
        zs_cfg = dict(data_cfg.get("zeroshot") or {})
        for name in settings.overdefense.ordinary_zeroshot:
            if name in zs_cfg:
                inputs.zeroshot[name] = load_zeroshot_task(name, zs_cfg[name])
            else:
                inputs.skipped[f"zeroshot {name}"] = "not in data.zeroshot"
        for name, spec in (settings.overdefense.zeroshot or {}).items():
            root = (spec or {}).get("root")
            if root is not None and not Path(str(root)).is_dir():
                inputs.skipped[f"zeroshot {name}"] = f"no such folder: {root}"
                continue
            inputs.zeroshot[name] = load_zeroshot_task(name, spec)
    return inputs


# ----------------------------------------------------------------------------- activations
class ActivationCache:
    """Activations of one model, per (tower, input list): each input set is encoded once."""

    def __init__(self, bundle: ClipBundle, batch_size: int, num_workers: int):
        self.bundle, self.batch_size, self.num_workers = bundle, batch_size, num_workers
        self.store: dict[tuple[str, str, tuple[str, ...]], Activations] = {}

    def get(self, tower: str, key: str, items: Sequence[Any], kinds: Sequence[str] = ("heads",)) -> Activations:
        k = (tower, key, tuple(kinds))
        if k not in self.store:
            self.store[k] = activations(self.bundle, tower, list(items), kinds, self.batch_size, self.num_workers)
        return self.store[k]

    def pair(self, tower: str, key: str, items: LabelledItems, kinds: Sequence[str] = ("heads",)) -> tuple[Activations, Activations]:
        return self.get(tower, f"{key}/safe", items.safe, kinds), self.get(tower, f"{key}/unsafe", items.unsafe, kinds)


# ----------------------------------------------------------------------------- detector part
def _eval_sets(inputs: Inputs, tower: str) -> dict[str, LabelledItems]:
    sets = {}
    if tower in inputs.test:
        sets["test"] = inputs.test[tower]
    if tower in inputs.nsfw_caps:
        sets["nsfw_caps"] = inputs.nsfw_caps[tower]
    return sets


def _apply(det: Any, acts: Activations) -> torch.Tensor:
    if isinstance(det, LinearDetector):
        return det.scores(heads=acts.heads, final=acts.final)
    return det.scores(acts.final)


def _evaluate_detectors(detectors: Mapping[str, Any], cache: ActivationCache, inputs: Inputs, tower: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, det in detectors.items():
        row: dict[str, Any] = {}
        for set_name, items in _eval_sets(inputs, tower).items():
            safe, unsafe = cache.pair(tower, set_name, items)
            row[set_name] = detection_metrics(_apply(det, safe), _apply(det, unsafe), det.threshold)
        if inputs.borderline is not None:
            bl = {}
            for kind, by_tower in inputs.borderline.inputs.items():
                if tower in by_tower:
                    flags = _apply(det, cache.get(tower, f"borderline/{kind}", by_tower[tower])) > det.threshold
                    bl[kind] = float(flags.float().mean())
            row["borderline_flag_rate"] = bl  # lookalike / control: false positives; twin: detections
        out[name] = row
    return out


def detector_part(
    bundle: ClipBundle, cache: ActivationCache, inputs: Inputs, s: DetectorSettings,
    reference_detectors: Mapping[str, LinearDetector] | None,
) -> tuple[dict[str, Any], dict[str, LinearDetector]]:
    result: dict[str, Any] = {}
    heads_found: dict[str, LinearDetector] = {}
    model_info = {"arch": bundle.arch, "source": bundle.source, "weights_fingerprint": weights_fingerprint(bundle.model)}
    for tower in s.towers:
        if tower not in inputs.calibration:
            result[tower] = {"skipped": f"no {tower} calibration items (the calibration splits have none)"}
            continue
        items = inputs.calibration[tower]
        safe, unsafe = cache.pair(tower, "calibration", items)
        X, y = labelled_activations(safe.heads, unsafe.heads)
        final, _ = labelled_activations(safe.final, unsafe.final)
        kw = dict(target_fpr=float(s.target_fpr), folds=int(s.folds), seed=int(s.seed))
        head_det, scores = calibrate_head_detector(X, y, tower, method=s.direction, strength=s.strength, **kw)
        head_det.model = model_info
        head_det.calibration.update({"fingerprint": items.fingerprint(), "source": items.source, "splits": list(s.splits)})
        heads_found[tower] = head_det
        detectors = {
            "head": head_det,
            "mean_diff": calibrate_linear(final, y, tower, method="mean_diff", **kw),
            "knn": calibrate_knn(final, y, tower, int(s.knn_k), float(s.target_fpr)),
        }
        ranking = scores.ranking()
        result[tower] = {
            "head": head_det.describe(),
            "head_auc": [[round(float(v), 5) for v in row] for row in scores.auc],
            "head_separation": [[round(float(v), 4) for v in row] for row in scores.separation],
            "runner_up": [{"layer": l, "head": h, "auc": float(scores.auc[l, h])} for l, h in ranking[1:4]],
            "methods": _evaluate_detectors(detectors, cache, inputs, tower),
        }
        if tower in inputs.test:
            result[tower]["test_halves"] = _test_halves(cache, inputs.test[tower], tower, s)
        ref = (reference_detectors or {}).get(tower)
        if ref is not None and not _fits(ref, X):
            result[tower]["reference_head_skipped"] = "the reference model's heads have another shape than this model's"
        elif ref is not None:
            result[tower]["reference_head"] = {
                "layer": ref.layer,
                "head": ref.head,
                **_evaluate_detectors({"reference_head": ref}, cache, inputs, tower)["reference_head"],
            }
    return result, heads_found


def _test_halves(cache: ActivationCache, items: LabelledItems, tower: str, s: DetectorSettings) -> dict[str, Any]:
    """A diagnostic, not a detector: the best head calibrated on one stratified half of the test
    split and measured on the other. Against the real detector (calibrated on other splits) it
    tells how much of a shortfall is the head and how much the calibration data's shift."""
    safe, unsafe = cache.pair(tower, "test", items)
    X, y = labelled_activations(safe.heads, unsafe.heads)
    fit, held = stratified_halves(y, int(s.seed))
    det, _ = calibrate_head_detector(X[fit], y[fit], tower, float(s.target_fpr), s.direction, s.strength, int(s.folds), int(s.seed))
    scores = det.scores(heads=X[held])
    return {"layer": det.layer, "head": det.head, **detection_metrics(scores[~y[held]], scores[y[held]], det.threshold)}


def _fits(det: LinearDetector, heads: torch.Tensor) -> bool:
    return det.layer < heads.shape[1] and det.head < heads.shape[2] and det.direction.numel() == heads.shape[3]


def _same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


# ----------------------------------------------------------------------------- geometry part
GEOMETRY_KINDS = ("resid", "mlp_in", "mlp_hidden")


def geometry_part(
    bundle: ClipBundle, cache: ActivationCache, inputs: Inputs, s: GeometrySettings, seed: int,
    reference_state: Mapping[str, torch.Tensor] | None, reference_embeddings: Mapping[str, torch.Tensor] | None,
    basis: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    out: dict[str, Any] = {"separability": {}, "null_space": {}}
    state = {k: v.detach().float().cpu() for k, v in bundle.model.state_dict().items()} if reference_state is not None else None
    if state is not None and not _same_architecture(reference_state, state):
        out["weight_change_skipped"] = "another architecture than the reference model's: no weight change to measure"
        state = None
    for tower, items in inputs.test.items():
        sub = LabelledItems(tower, sample(items.safe, s.per_class, seed), sample(items.unsafe, s.per_class, seed + 1), items.source)
        safe, unsafe = cache.pair(tower, "geometry", sub, GEOMETRY_KINDS)
        y = sub.labels
        layers = []
        for layer in range(safe.resid.shape[1]):
            X = torch.cat([safe.resid[:, layer], unsafe.resid[:, layer]])
            layers.append({"layer": layer, **geo.separability(X, y, seed)})
        layers.append({"layer": "final", **geo.separability(torch.cat([safe.final, unsafe.final]), y, seed)})
        out["separability"][tower] = layers
        if state is not None:
            acts_s = {"mlp_in": safe.mlp_in, "mlp_hidden": safe.mlp_hidden}
            acts_u = {"mlp_in": unsafe.mlp_in, "mlp_hidden": unsafe.mlp_hidden}
            out["null_space"][tower] = geo.mlp_null_space(reference_state, state, tower, acts_s, acts_u, s.energy)
    if state is not None:
        out["weight_change"] = geo.weight_change(reference_state, state)
    embeddings = _picture_embeddings(cache, inputs, s, seed)
    sets = dict(embeddings)
    if reference_embeddings is not None and reference_embeddings["safe captions"].shape[1] == embeddings["safe captions"].shape[1]:
        sets["targets (text)"] = reference_embeddings["safe captions"]
        if "safe images" in reference_embeddings:
            sets["targets (image)"] = reference_embeddings["safe images"]
    dims = {int(x.shape[1]) for x in sets.values()}
    if basis is not None and dims != {int(basis[0].shape[1])}:
        basis = None  # embeddings of another width than the reference's: this model's own axes
    coords, method = geo.project_2d(sets, basis, s.projection, seed)
    out["projection"] = {"method": method, "points": {k: [[round(float(a), 4), round(float(b), 4)] for a, b in v] for k, v in coords.items()}}
    return out, embeddings


def _picture_embeddings(cache: ActivationCache, inputs: Inputs, s: GeometrySettings, seed: int) -> dict[str, torch.Tensor]:
    """Final embeddings of a sample of test items: safe / unsafe captions and images, item-aligned
    (the safe side is each unsafe item's minimal edit: what redirection should reach)."""
    qset = inputs.test_split
    order = sample(list(range(len(qset))), s.projection_items, seed)
    items = [qset[i] for i in order]
    out = {
        "safe captions": cache.get("text", "picture/S", [q.safe_caption for q in items]).final,
        "unsafe captions": cache.get("text", "picture/U", [q.unsafe_caption for q in items]).final,
    }
    if qset.mode.has_unsafe_images:
        out["safe images"] = cache.get("image", "picture/V", [str(q.safe_image) for q in items]).final
        out["unsafe images"] = cache.get("image", "picture/G", [str(q.unsafe_image) for q in items]).final
    return out


# ----------------------------------------------------------------------------- over-defensiveness
def overdefense_part(
    bundle: ClipBundle, inputs: Inputs, batch_size: int, num_workers: int, gallery: Any = None, name: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``gallery``: a :class:`saferclip.evaluation.showcase.Showcase` collecting the report's
    retrieval galleries from the same embeddings (model ``name``)."""
    out: dict[str, Any] = {"retrieval": {}, "zeroshot": {}}
    hits: dict[str, torch.Tensor] = {}
    kw = dict(batch_size=batch_size, num_workers=num_workers, progress=False)
    test = embed_visu(bundle, inputs.test_split, **kw)
    if gallery is not None:
        gallery.add(name, "ViSU", inputs.test_split, test)
    metrics = visu_metrics(test)
    out["unsafe_rate"] = metrics.get("U2VG_unsafe@1")
    out["retrieval"]["ordinary"] = {k: metrics[k] for k in RETRIEVAL_KEYS if k in metrics}
    if test.safe_image is not None:
        hits["ordinary"] = caption_hits(test)
    if inputs.borderline is not None:
        for kind, qset in inputs.borderline.quadruplets.items():
            emb = embed_visu(bundle, qset, **kw)
            if gallery is not None and kind == "lookalike":
                gallery.add(name, "Borderline", qset, emb, "borderline")
            m = visu_metrics(emb)
            out["retrieval"][kind] = {k: m[k] for k in RETRIEVAL_KEYS if k in m}
            out.setdefault("resemblance", {})[kind] = resemblance(emb)
            if emb.safe_image is not None:
                hits[kind] = caption_hits(emb)
    for task_name, task in inputs.zeroshot.items():
        out["zeroshot"][task_name] = evaluate_zeroshot(bundle, task, name=task_name, **kw)["acc1"]
    return out, hits


# ----------------------------------------------------------------------------- the run
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
        raise ConfigError(f"reference model {reference!r} is not among the models {list(specs)}; add it or set reference=null")
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
            out["detector"], found = detector_part(bundle, cache, inputs, settings.detector, None if is_ref else ref.get("detectors"))
            if is_ref:
                ref["detectors"] = found
            if detectors_dir is not None and settings.detector.save and found:
                path = save_detectors(Path(detectors_dir) / f"{name}.safetensors", found, force=force, info={"model_name": name})
                out["detector"]["file"] = str(path)
            timings["detector"] = time.perf_counter() - t
        if "geometry" in settings.parts:
            t = time.perf_counter()
            out["geometry"], emb = geometry_part(
                bundle, cache, inputs, settings.geometry, seed,
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
                out["overdefense"]["redirected_away"] = {k: redirected_away(v, ref["hits"][k]) for k, v in hits.items() if k in ref["hits"]}
            timings["overdefense"] = time.perf_counter() - t
        if "detector" in out and "overdefense" in out:
            out["overdefense"]["detector_flag_rate"] = {
                tower: r["methods"]["head"].get("borderline_flag_rate", {}) for tower, r in out["detector"].items() if isinstance(r, dict) and "methods" in r
            }
        described[name] = {"arch": bundle.arch, "source": bundle.source, "pretrained": specs[name].pretrained,
                           "seconds": round(time.perf_counter() - started, 2), "timings": {k: round(v, 2) for k, v in timings.items()}}
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
    from dataclasses import asdict

    return asdict(settings)

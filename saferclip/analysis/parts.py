"""The three analysis parts on one model, each reading the inputs through one
:class:`ActivationCache` (every input set encoded once per model):

* :func:`detector_part` — per tower, the best single-head detector and the two
  final-embedding baselines, calibrated and measured; the reference model's head inside
  this one;
* :func:`geometry_part` — per-layer separability, the MLP changes' null-space share, weight
  change, a 2-D picture of the embeddings;
* :func:`overdefense_part` — borderline-safe retrieval and zero-shot accuracy.

What is compared with the reference model comes in as arguments; :func:`saferclip.analysis.
runner.analyze_models` runs the parts model by model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..evaluation.retrieval import embed_visu, visu_metrics
from ..evaluation.zeroshot import evaluate_zeroshot
from ..model.build import ClipBundle, weights_fingerprint
from . import geometry as geo
from .detector import (
    LabelledItems,
    LinearDetector,
    calibrate_head_detector,
    calibrate_knn,
    calibrate_linear,
    detection_metrics,
    labelled_activations,
    sample,
)
from .heads import Activations, activations
from .inputs import Inputs
from .overdefense import RETRIEVAL_KEYS, caption_hits, resemblance
from .settings import DetectorSettings, GeometrySettings
from .stats import stratified_halves


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

    def pair(
        self, tower: str, key: str, items: LabelledItems, kinds: Sequence[str] = ("heads",)
    ) -> tuple[Activations, Activations]:
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


def _evaluate_detectors(
    detectors: Mapping[str, Any], cache: ActivationCache, inputs: Inputs, tower: str
) -> dict[str, Any]:
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
    bundle: ClipBundle,
    cache: ActivationCache,
    inputs: Inputs,
    s: DetectorSettings,
    reference_detectors: Mapping[str, LinearDetector] | None,
) -> tuple[dict[str, Any], dict[str, LinearDetector]]:
    result: dict[str, Any] = {}
    heads_found: dict[str, LinearDetector] = {}
    model_info = {
        "arch": bundle.arch,
        "source": bundle.source,
        "weights_fingerprint": weights_fingerprint(bundle.model),
    }
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
        head_det.calibration.update(
            {"fingerprint": items.fingerprint(), "source": items.source, "splits": list(s.splits)}
        )
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
            "runner_up": [{"layer": layer, "head": h, "auc": float(scores.auc[layer, h])} for layer, h in ranking[1:4]],
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
    det, _ = calibrate_head_detector(
        X[fit], y[fit], tower, float(s.target_fpr), s.direction, s.strength, int(s.folds), int(s.seed)
    )
    scores = det.scores(heads=X[held])
    return {"layer": det.layer, "head": det.head, **detection_metrics(scores[~y[held]], scores[y[held]], det.threshold)}


def _fits(det: LinearDetector, heads: torch.Tensor) -> bool:
    return det.layer < heads.shape[1] and det.head < heads.shape[2] and det.direction.numel() == heads.shape[3]


def _same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


# ----------------------------------------------------------------------------- geometry part
GEOMETRY_KINDS = ("resid", "mlp_in", "mlp_hidden")


def geometry_part(
    bundle: ClipBundle,
    cache: ActivationCache,
    inputs: Inputs,
    s: GeometrySettings,
    seed: int,
    reference_state: Mapping[str, torch.Tensor] | None,
    reference_embeddings: Mapping[str, torch.Tensor] | None,
    basis: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    out: dict[str, Any] = {"separability": {}, "null_space": {}}
    state = (
        {k: v.detach().float().cpu() for k, v in bundle.model.state_dict().items()}
        if reference_state is not None
        else None
    )
    if state is not None and not _same_architecture(reference_state, state):
        out["weight_change_skipped"] = "another architecture than the reference model's: no weight change to measure"
        state = None
    for tower, items in inputs.test.items():
        sub = LabelledItems(
            tower, sample(items.safe, s.per_class, seed), sample(items.unsafe, s.per_class, seed + 1), items.source
        )
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
    if (
        reference_embeddings is not None
        and reference_embeddings["safe captions"].shape[1] == embeddings["safe captions"].shape[1]
    ):
        sets["targets (text)"] = reference_embeddings["safe captions"]
        if "safe images" in reference_embeddings:
            sets["targets (image)"] = reference_embeddings["safe images"]
    dims = {int(x.shape[1]) for x in sets.values()}
    if basis is not None and dims != {int(basis[0].shape[1])}:
        basis = None  # embeddings of another width than the reference's: this model's own axes
    coords, method = geo.project_2d(sets, basis, s.projection, seed)
    out["projection"] = {
        "method": method,
        "points": {k: [[round(float(a), 4), round(float(b), 4)] for a, b in v] for k, v in coords.items()},
    }
    return out, embeddings


def _picture_embeddings(
    cache: ActivationCache, inputs: Inputs, s: GeometrySettings, seed: int
) -> dict[str, torch.Tensor]:
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


__all__ = ["GEOMETRY_KINDS", "ActivationCache", "detector_part", "geometry_part", "overdefense_part"]

"""A training-free unsafe-input detector read from one attention head (after "One head to rule
them all", Oh Defense), and two baselines on the final embeddings.

Calibration: a small labelled set of safe and unsafe captions (or images). Every attention
head of every layer is scored by how well *one direction* separates its output at the pooled
token (:mod:`.heads`) on that set: the direction (Fisher / logistic / mean difference, config)
is fitted on k-1 folds and scores the held-out fold, so each calibration item gets an
out-of-fold score; a head's score is the ROC AUC of those (ties broken by the separation d').
The best head keeps the direction fitted on the whole set, and the threshold is the
split-conformal quantile of the safe items' *out-of-fold* scores for the target
false-positive rate (in-sample scores of a fitted direction are optimistic: a threshold set on
them flags more new safe inputs than asked).

Baselines, on the final (normalised) embeddings, calibrated the same way: the mean-difference
direction, and the mean cosine similarity to the k nearest unsafe calibration items.

A :class:`HeadDetector` saves to a small safetensors file (the direction) whose metadata holds
a JSON description (architecture, layer, head, threshold, model weights and calibration data
fingerprints); :func:`load_detectors` reads it back without pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..integrity import DamagedArtefact, digest_parts
from ..model.checkpoints import CheckpointError, save_state_dict
from .stats import (
    calibrate_threshold,
    fisher_direction,
    mean_difference,
    rates,
    roc_auc,
    separation,
)

log = logging.getLogger(__name__)

FORMAT = "saferclip-detector"
FORMAT_VERSION = 1
DIRECTION_METHODS = ("fisher", "logistic", "mean_diff")


# ----------------------------------------------------------------------------- labelled inputs
@dataclass
class LabelledItems:
    """Safe and unsafe inputs of one modality: captions (``tower="text"``) or image files."""

    tower: str
    safe: list[Any]
    unsafe: list[Any]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.safe or not self.unsafe:
            raise ValueError(
                f"{self.source or 'labelled set'}: needs safe and unsafe items, got {len(self.safe)} safe and {len(self.unsafe)} unsafe"
            )

    @property
    def labels(self) -> Tensor:
        """``[N]`` bool, True = unsafe, for ``safe + unsafe`` in that order."""
        return torch.cat(
            [torch.zeros(len(self.safe), dtype=torch.bool), torch.ones(len(self.unsafe), dtype=torch.bool)]
        )

    def fingerprint(self) -> str:
        """SHA-256 of the items: caption text, or image file bytes (moving the data keeps it)."""
        h = hashlib.sha256(f"{self.tower};{len(self.safe)};{len(self.unsafe)}\n".encode())
        for label, items in (("safe", self.safe), ("unsafe", self.unsafe)):
            for item in items:
                h.update(label.encode())
                h.update(Path(item).read_bytes() if self.tower == "image" else str(item).encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------- directions
def logistic_direction(X: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 50, tol: float = 1e-8) -> Tensor:
    """Unit direction ``[d]`` of an L2-regularised logistic regression (mean log-loss +
    ``l2 * ‖w‖²`` on standardised features, bias unregularised), fitted by Newton's method with
    step halving (a few iterations for tens to hundreds of dimensions), mapped back to the raw
    feature space."""
    X = X.detach().double()
    t = torch.as_tensor(y, dtype=torch.bool).double()
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    Z = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)  # last column: bias
    n, d = Z.shape
    reg = torch.full((d,), 2 * l2, dtype=X.dtype)
    reg[-1] = 0.0
    w = torch.zeros(d, dtype=X.dtype)

    def objective(w: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(Z @ w, t) + l2 * w[:-1].pow(2).sum()

    loss = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(Z @ w)
        grad = Z.T @ (p - t) / n + reg * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z / n + torch.diag(reg) + 1e-10 * torch.eye(d, dtype=X.dtype)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while True:
            candidate = w - scale * step
            new_loss = objective(candidate)
            if new_loss <= loss or scale < 1e-4:
                break
            scale /= 2
        converged = float(loss - new_loss) < tol
        w, loss = candidate, new_loss
        if converged:
            break
    v = w[:-1] / sd
    return (v / v.norm().clamp_min(1e-12)).float()


def fit_direction(X: Tensor, y: Tensor, method: str = "logistic", strength: float | None = None) -> Tensor:
    """A unit direction ``[d]`` along which unsafe items (``y`` True) score higher.
    ``strength``: the logistic L2 weight (default 1e-3) or the Fisher shrinkage (default 0.05)."""
    if method == "logistic":
        return logistic_direction(X, y, 1e-3 if strength is None else strength)
    if method == "fisher":
        return fisher_direction(X, y, 0.05 if strength is None else strength)
    if method == "mean_diff":
        return mean_difference(X, y)
    raise ConfigError(f"direction method must be one of {DIRECTION_METHODS}, got {method!r}")


def stratified_folds(y: Tensor, folds: int, seed: int = 0) -> Tensor:
    """``[N]`` fold index of each item, every class spread evenly over ``folds`` (seeded)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    for cls, name in ((False, "safe"), (True, "unsafe")):
        if int((y == cls).sum()) < folds:
            raise ConfigError(
                f"calibration needs at least {folds} {name} items for {folds} folds, got {int((y == cls).sum())}"
            )
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(y), dtype=torch.long)
    for cls in (False, True):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[idx] = torch.arange(len(idx)) % folds
    return out


def out_of_fold_scores(X: Tensor, y: Tensor, fold: Tensor, method: str, strength: float | None = None) -> Tensor:
    """``[N]`` each item scored by the direction fitted without its fold."""
    scores = torch.empty(len(X))
    for k in range(int(fold.max()) + 1):
        held = fold == k
        w = fit_direction(X[~held], y[~held], method, strength)
        scores[held] = X[held].float() @ w
    return scores


# ----------------------------------------------------------------------------- head scoring
@dataclass
class HeadScores:
    """Out-of-fold ROC AUC and separation d' of every head, ``[layers, heads]`` each."""

    auc: Tensor
    separation: Tensor

    def ranking(self) -> list[tuple[int, int]]:
        """(layer, head) from best to worst: AUC (to 4 decimals), then d'."""
        layers, heads = self.auc.shape
        cells = [(layer, h) for layer in range(layers) for h in range(heads)]
        return sorted(cells, key=lambda c: (-round(float(self.auc[c]), 4), -float(self.separation[c])))

    def best(self) -> tuple[int, int]:
        return self.ranking()[0]


def score_heads(
    heads: Tensor, y: Tensor, method: str = "logistic", strength: float | None = None, folds: int = 5, seed: int = 0
) -> HeadScores:
    """Score every head of ``heads [N, layers, H, d_head]`` (labels ``y [N]``, True = unsafe)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    fold = stratified_folds(y, folds, seed)
    layers, n_heads = heads.shape[1], heads.shape[2]
    auc = torch.empty(layers, n_heads)
    sep = torch.empty(layers, n_heads)
    for layer in range(layers):
        for h in range(n_heads):
            s = out_of_fold_scores(heads[:, layer, h], y, fold, method, strength)
            auc[layer, h], sep[layer, h] = roc_auc(s, y), separation(s, y)
    return HeadScores(auc, sep)


# ----------------------------------------------------------------------------- detectors
@dataclass
class LinearDetector:
    """Flags an input when ``features @ direction > threshold``. ``layer``/``head`` locate the
    features in the tower (None for the final embedding)."""

    tower: str
    direction: Tensor
    threshold: float
    target_fpr: float
    method: str
    layer: int | None = None
    head: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "head" if self.head is not None else "final_embedding"

    def features(self, heads: Tensor | None = None, final: Tensor | None = None) -> Tensor:
        if self.head is None:
            if final is None:
                raise ValueError("this detector reads the final embedding; pass final=")
            return final
        if heads is None:
            raise ValueError("this detector reads a head; pass heads= [N, layers, H, d_head]")
        return heads[:, self.layer, self.head]

    def scores(self, heads: Tensor | None = None, final: Tensor | None = None) -> Tensor:
        return self.features(heads, final).float() @ self.direction

    def flags(self, heads: Tensor | None = None, final: Tensor | None = None) -> Tensor:
        return self.scores(heads, final) > self.threshold

    def describe(self) -> dict[str, Any]:
        """Everything but the direction, as JSON-ready data."""
        out = {k: v for k, v in asdict(self).items() if k != "direction"}
        out["kind"] = self.kind
        out["dim"] = int(self.direction.numel())
        return out


@dataclass
class KnnDetector:
    """Flags an input whose mean cosine similarity to its ``k`` nearest unsafe calibration items
    exceeds ``threshold`` (final embeddings)."""

    tower: str
    bank: Tensor
    k: int
    threshold: float
    target_fpr: float

    def scores(self, final: Tensor) -> Tensor:
        sims = F.normalize(final.float(), dim=-1) @ F.normalize(self.bank.float(), dim=-1).T
        return sims.topk(min(self.k, len(self.bank)), dim=1).values.mean(1)

    def flags(self, final: Tensor) -> Tensor:
        return self.scores(final) > self.threshold


def calibrate_linear(
    X: Tensor,
    y: Tensor,
    tower: str,
    target_fpr: float = 0.05,
    method: str = "logistic",
    strength: float | None = None,
    folds: int = 5,
    seed: int = 0,
    layer: int | None = None,
    head: int | None = None,
) -> LinearDetector:
    """A :class:`LinearDetector` on features ``X [N, d]``: direction fitted on everything, threshold
    from the safe items' out-of-fold scores (module docstring)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    fold = stratified_folds(y, folds, seed)
    oof = out_of_fold_scores(X, y, fold, method, strength)
    threshold = calibrate_threshold(oof[~y], target_fpr)
    w = fit_direction(X, y, method, strength)
    calibration = {
        "num_safe": int((~y).sum()),
        "num_unsafe": int(y.sum()),
        "folds": folds,
        "seed": seed,
        "strength": strength,
        "out_of_fold_auc": roc_auc(oof, y),
        "out_of_fold_separation": separation(oof, y),
        "out_of_fold": rates(oof, y, threshold),
    }
    return LinearDetector(tower, w, threshold, target_fpr, method, layer, head, calibration)


def calibrate_head_detector(
    heads: Tensor,
    y: Tensor,
    tower: str,
    target_fpr: float = 0.05,
    method: str = "logistic",
    strength: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[LinearDetector, HeadScores]:
    """Score every head of ``heads [N, layers, H, d_head]``, keep the best, calibrate it."""
    scores = score_heads(heads, y, method, strength, folds, seed)
    layer, head = scores.best()
    detector = calibrate_linear(heads[:, layer, head], y, tower, target_fpr, method, strength, folds, seed, layer, head)
    return detector, scores


def calibrate_knn(final: Tensor, y: Tensor, tower: str, k: int = 5, target_fpr: float = 0.05) -> KnnDetector:
    """The k-NN baseline: the unsafe calibration items are the bank; the threshold comes from
    the safe calibration items' scores (they are not in the bank, so these are honest)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    det = KnnDetector(tower, final[y].float(), k, math.inf, target_fpr)
    det.threshold = calibrate_threshold(det.scores(final[~y]), target_fpr)
    return det


def detection_metrics(safe_scores: Tensor, unsafe_scores: Tensor, threshold: float) -> dict[str, float]:
    """Detection rate (unsafe flagged), false-positive rate (safe flagged) and ROC AUC."""
    scores = torch.cat([safe_scores.flatten(), unsafe_scores.flatten()])
    labels = torch.cat(
        [torch.zeros(len(safe_scores), dtype=torch.bool), torch.ones(len(unsafe_scores), dtype=torch.bool)]
    )
    return {**rates(scores, labels, threshold), "auc": roc_auc(scores, labels)}


# ----------------------------------------------------------------------------- files
def save_detectors(
    path: str | os.PathLike,
    detectors: Mapping[str, LinearDetector],
    force: bool = False,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write head detectors (tower -> detector) to one safetensors file: the directions as
    tensors ``<tower>.direction``, the rest as JSON in the metadata. Atomic; an existing file
    is replaced only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force to replace it")
    if not detectors:
        raise ValueError("no detector to save")
    described = {}
    for tower, det in detectors.items():
        if det.tower != tower:
            raise ValueError(f"detector under {tower!r} is for the {det.tower} tower")
        described[tower] = det.describe()
    header = {"format": FORMAT, "version": FORMAT_VERSION, "detectors": described, **dict(info or {})}
    tensors = {
        f"{tower}.direction": det.direction.detach().float().contiguous().cpu() for tower, det in detectors.items()
    }
    text = json.dumps(header, default=str)
    metadata = {"format": FORMAT, "saferclip_detector": text, "saferclip_checksum": content_checksum(text, tensors)}
    save_state_dict(tensors, path, metadata=metadata)
    return path


def content_checksum(header: str, tensors: Mapping[str, Tensor]) -> str:
    """The digest of a detector or coverage-monitor file's content: its JSON header and every
    tensor (by name)."""
    parts: list[Any] = [header]
    for name in sorted(tensors):
        parts += [name, str(tensors[name].dtype), str(tuple(tensors[name].shape)), tensors[name].float().numpy()]
    return digest_parts(parts)


def load_detectors(path: str | os.PathLike) -> dict[str, LinearDetector]:
    """Read a file written by :func:`save_detectors` (safetensors and JSON only; no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a saferclip detector file (not readable as safetensors: {e})") from None
    if metadata.get("format") != FORMAT or "saferclip_detector" not in metadata:
        raise CheckpointError(f"{path}: not a saferclip detector file (its metadata has no '{FORMAT}' header)")
    checksum = metadata.get("saferclip_checksum")
    if checksum is None:
        log.warning(
            "%s: detector file without a checksum (written by an older saferclip): its integrity cannot be checked",
            path,
        )
    elif checksum != content_checksum(metadata["saferclip_detector"], tensors):
        raise DamagedArtefact(
            path,
            "detector: checksum mismatch, its content changed since it was saved; refusing to use it (calibrate a new one with saferclip-analyze)",
        )
    try:
        header = json.loads(metadata["saferclip_detector"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: detector header is not valid JSON ({e})") from None
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: detector format version {header.get('version')!r}; this saferclip reads version {FORMAT_VERSION}"
        )
    out = {}
    for tower, d in (header.get("detectors") or {}).items():
        key = f"{tower}.direction"
        if key not in tensors:
            raise CheckpointError(f"{path}: detector {tower!r} has no tensor {key!r}")
        try:
            det = LinearDetector(
                tower=d["tower"],
                direction=tensors[key].float(),
                threshold=float(d["threshold"]),
                target_fpr=float(d["target_fpr"]),
                method=str(d["method"]),
                layer=None if d.get("layer") is None else int(d["layer"]),
                head=None if d.get("head") is None else int(d["head"]),
                calibration=dict(d.get("calibration") or {}),
                model=dict(d.get("model") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: detector {tower!r}: missing or invalid field {e}") from None
        if not (bool(torch.isfinite(det.direction).all()) and math.isfinite(det.threshold)):
            raise DamagedArtefact(path, f"detector {tower!r}: non-finite (NaN/inf) direction or threshold")
        if det.direction.dim() != 1 or det.direction.numel() != int(d.get("dim", det.direction.numel())):
            raise CheckpointError(
                f"{path}: detector {tower!r}: direction has shape {tuple(det.direction.shape)}, expected [{d.get('dim')}]"
            )
        out[tower] = det
    if not out:
        raise CheckpointError(f"{path}: the file holds no detector")
    return out


def read_detector_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a detector file (model, calibration, every detector's description)."""
    from safetensors.torch import safe_open

    load_detectors(path)  # validates
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["saferclip_detector"])


def labelled_activations(heads_safe: Tensor, heads_unsafe: Tensor) -> tuple[Tensor, Tensor]:
    """Stack safe then unsafe ``[N, ...]`` activations and their labels."""
    y = torch.cat([torch.zeros(len(heads_safe), dtype=torch.bool), torch.ones(len(heads_unsafe), dtype=torch.bool)])
    return torch.cat([heads_safe, heads_unsafe]), y


def sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """Up to ``n`` distinct items in a seeded random order (sorted first: the result does not
    depend on the order the data was read in)."""
    unique = sorted(dict.fromkeys(items), key=str)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(unique), generator=g).tolist()
    return [unique[i] for i in order[:n]]

"""Small statistics on feature matrices, in torch (no scikit-learn needed): separating
directions, ROC AUC, threshold calibration at a target false-positive rate, a linear probe,
silhouette and PCA.

Conventions: features ``X [N, d]`` float, labels ``y [N]`` bool (True = unsafe, the positive
class). A score is higher for "more unsafe".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..evaluation.metrics import roc_auc  # noqa: F401  (it lives with the other metrics; analysis re-exports it)


def _split(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.as_tensor(y, dtype=torch.bool)
    if X.dim() != 2 or len(X) != len(y):
        raise ValueError(f"features [N, d] and labels [N] must match, got {tuple(X.shape)} and {tuple(y.shape)}")
    pos, neg = X[y], X[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need both classes, got {len(neg)} safe and {len(pos)} unsafe items")
    return pos, neg


def mean_difference(X: Tensor, y: Tensor) -> Tensor:
    """Unit direction ``[d]`` from the safe mean to the unsafe mean."""
    pos, neg = _split(X.double(), y)
    w = pos.mean(0) - neg.mean(0)
    return (w / w.norm().clamp_min(1e-12)).float()


def fisher_direction(X: Tensor, y: Tensor, shrinkage: float = 0.1) -> Tensor:
    """Unit Fisher (LDA) direction ``[d]``: the pooled within-class covariance, shrunk towards
    its mean variance by ``shrinkage`` (a few hundred items in tens of dimensions need it),
    applied inverse to the mean difference."""
    pos, neg = _split(X.double(), y)
    diff = pos.mean(0) - neg.mean(0)
    centred = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
    cov = centred.T @ centred / max(len(centred) - 2, 1)
    d = cov.shape[0]
    target = torch.eye(d, dtype=cov.dtype) * cov.diagonal().mean().clamp_min(1e-12)
    cov = (1 - shrinkage) * cov + shrinkage * target
    w = torch.linalg.solve(cov, diff)
    return (w / w.norm().clamp_min(1e-12)).float()


DIRECTIONS = {"mean_diff": mean_difference, "fisher": fisher_direction}


def direction(X: Tensor, y: Tensor, method: str = "fisher", shrinkage: float = 0.1) -> Tensor:
    if method not in DIRECTIONS:
        raise ValueError(f"direction method must be one of {sorted(DIRECTIONS)}, got {method!r}")
    return fisher_direction(X, y, shrinkage) if method == "fisher" else mean_difference(X, y)


def separation(scores: Tensor, labels: Tensor) -> float:
    """d': the distance between the class means of a score in pooled standard deviations."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.bool)
    pos, neg = scores[labels], scores[~labels]
    pooled = math.sqrt((float(pos.var(unbiased=False)) + float(neg.var(unbiased=False))) / 2)
    return float(pos.mean() - neg.mean()) / max(pooled, 1e-12)


def calibrate_threshold(safe_scores: Tensor, target_fpr: float) -> float:
    """The threshold ``t`` (flag when ``score > t``) at which at most ``target_fpr`` of new safe
    inputs are expected to be flagged: the ``ceil((n + 1)(1 - fpr))``-th smallest of ``n`` safe
    calibration scores (the split-conformal quantile: the false-positive rate on exchangeable
    new safe items is at most ``target_fpr`` in expectation). With too few safe items for the
    target, the largest score (no calibration item flagged)."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    values = torch.as_tensor(safe_scores, dtype=torch.float64).flatten().sort().values
    n = len(values)
    if n == 0:
        raise ValueError("no safe calibration scores")
    rank = math.ceil((n + 1) * (1 - target_fpr))
    return float(values[min(rank, n) - 1])


def rates(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Detection rate (unsafe flagged) and false-positive rate (safe flagged) at ``threshold``."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.bool)
    flagged = scores > threshold
    out = {"num_unsafe": int(labels.sum()), "num_safe": int((~labels).sum())}
    out["detection_rate"] = float(flagged[labels].float().mean()) if out["num_unsafe"] else math.nan
    out["false_positive_rate"] = float(flagged[~labels].float().mean()) if out["num_safe"] else math.nan
    return out


def stratified_halves(y: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two boolean masks ``[N]`` splitting each class in half at random (seeded)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(len(y), dtype=torch.bool)
    for cls in (True, False):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        first[idx[: len(idx) // 2]] = True
    return first, ~first


def probe_accuracy(X: Tensor, y: Tensor, seed: int = 0, shrinkage: float = 0.1) -> float:
    """Held-out accuracy of a linear probe: a Fisher direction and the midpoint threshold fitted
    on one stratified half, tested on the other, both ways, averaged."""
    a, b = stratified_halves(y, seed)
    y = torch.as_tensor(y, dtype=torch.bool)
    accs = []
    for fit, test in ((a, b), (b, a)):
        w = fisher_direction(X[fit], y[fit], shrinkage)
        s = X.float() @ w
        pos, neg = s[fit & y].mean(), s[fit & ~y].mean()
        pred = s[test] > (pos + neg) / 2
        accs.append(float((pred == y[test]).float().mean()))
    return sum(accs) / len(accs)


def silhouette(X: Tensor, y: Tensor) -> float:
    """Mean silhouette of the two clusters (safe, unsafe) under cosine distance, in [-1, 1]:
    near 1 when each item is much closer to its own class than to the other."""
    y = torch.as_tensor(y, dtype=torch.bool)
    Xn = torch.nn.functional.normalize(X.double(), dim=-1)
    dist = 1 - Xn @ Xn.T
    out = torch.empty(len(y), dtype=torch.float64)
    for cls in (True, False):
        own, other = y == cls, y != cls
        n_own = int(own.sum())
        if n_own < 2 or int(other.sum()) == 0:
            return math.nan
        a = dist[own][:, own].sum(1) / (n_own - 1)
        b = dist[own][:, other].mean(1)
        out[own] = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    return float(out.mean())


def pca(X: Tensor, k: int = 2, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` principal axes ``[k, d]`` of ``X`` and its mean ``[d]`` (``torch.pca_lowrank``
    would be randomised; the exact SVD of a few thousand rows is cheap)."""
    X = X.double()
    mean = X.mean(0) if center is None else center.double()
    _, _, vh = torch.linalg.svd(X - mean, full_matrices=False)
    return vh[:k].float(), mean.float()

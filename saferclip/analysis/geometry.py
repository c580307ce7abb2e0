"""Embedding geometry before and after safety fine-tuning (after "What makes and breaks safety
fine-tuning?").

That study finds that safety fine-tuning changes MLP weights minimally, so that unsafe inputs
fall in the *null space* of the change ΔW, which clusters inputs by whether the model treats
them as safe. For a CLIP pair (original, fine-tuned) this module measures:

* :func:`weight_change` — per block and sub-layer (attention: ``in_proj`` + ``out_proj``; MLP:
  ``c_fc`` + ``c_proj``), ``‖ΔW‖_F / ‖W‖_F`` (LoRA runs are merged before they get here);
* :func:`separability` — per layer, how separable safe and unsafe inputs are at the pooled
  token: held-out accuracy of a linear probe and the silhouette of the two clusters;
* :func:`null_space_share` — for each MLP matrix, the share of an input activation's energy
  ``‖P_r a‖² / ‖a‖²`` in the top-``r`` right singular directions of ΔW (``r``: the fewest
  directions holding ``energy`` of ΔW's squared Frobenius norm), for safe vs unsafe inputs,
  against the chance share ``r / d`` of an isotropic vector, and the share of the class-mean
  difference (what separates unsafe from safe inputs); and the relative output change
  ``‖ΔW a‖ / ‖W a‖``. A low share for unsafe inputs means they sit in the null space of the
  change (the paper's finding); a high one, that the change acts on them;
* :func:`project_2d` — a 2-D PCA basis fitted on the original model's embeddings (UMAP when
  installed and asked for), so every model's picture shares axes.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .stats import pca, probe_accuracy, silhouette

TOWER_PREFIX = {"text": "transformer.resblocks.", "image": "visual.transformer.resblocks."}
SUBLAYERS = {
    "attn": ("attn.in_proj_weight", "attn.out_proj.weight"),
    "mlp": ("mlp.c_fc.weight", "mlp.c_proj.weight"),
}
MLP_MATRICES = {"mlp_in": "mlp.c_fc.weight", "mlp_hidden": "mlp.c_proj.weight"}


def _num_blocks(state: Mapping[str, Tensor], tower: str) -> int:
    prefix = re.escape(TOWER_PREFIX[tower])
    layers = {int(m.group(1)) for k in state if (m := re.match(prefix + r"(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def _relative(pairs: list[tuple[Tensor, Tensor]]) -> float:
    num = sum(float((b.double() - a.double()).pow(2).sum()) for a, b in pairs)
    den = sum(float(a.double().pow(2).sum()) for a, _ in pairs)
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def weight_change(original: Mapping[str, Tensor], tuned: Mapping[str, Tensor]) -> dict[str, Any]:
    """``{tower: [{"layer", "attn", "mlp"}...], "other": {...}}``: relative Frobenius change per
    block and sub-layer, and over every other parameter group (embeddings, norms, projections)."""
    missing = sorted(set(original) ^ set(tuned))
    if missing:
        raise ConfigError(
            f"the two models have different parameters (e.g. {missing[0]}); compare models of one architecture"
        )
    used: set[str] = set()
    out: dict[str, Any] = {}
    for tower, prefix in TOWER_PREFIX.items():
        rows = []
        for layer in range(_num_blocks(original, tower)):
            row: dict[str, Any] = {"layer": layer}
            for sub, names in SUBLAYERS.items():
                keys = [f"{prefix}{layer}.{n}" for n in names if f"{prefix}{layer}.{n}" in original]
                used.update(keys)
                row[sub] = _relative([(original[k], tuned[k]) for k in keys]) if keys else math.nan
            rows.append(row)
        out[tower] = rows
    rest = [k for k in original if k not in used and original[k].is_floating_point()]
    out["other"] = {"relative_change": _relative([(original[k], tuned[k]) for k in rest]), "num_tensors": len(rest)}
    return out


def separability(X: Tensor, y: Tensor, seed: int = 0) -> dict[str, float]:
    """Probe accuracy (held-out halves) and silhouette of safe vs unsafe features ``X [N, d]``."""
    return {"probe_accuracy": probe_accuracy(X, y, seed), "silhouette": silhouette(X, y)}


def top_directions(delta: Tensor, energy: float = 0.9) -> tuple[Tensor, int, Tensor]:
    """Right singular vectors ``[r, d_in]`` of ``delta [d_out, d_in]`` holding ``energy`` of its
    squared Frobenius norm, ``r``, and all singular values."""
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    _, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float(s.pow(2).sum())
    if total == 0.0:
        return vh[:0].float(), 0, s.float()
    cumulative = s.pow(2).cumsum(0) / total
    r = int((cumulative < energy - 1e-12).sum()) + 1
    return vh[:r].float(), r, s.float()


def null_space_share(
    weight: Tensor, delta: Tensor, safe: Tensor, unsafe: Tensor, energy: float = 0.9
) -> dict[str, float]:
    """How much of the inputs ``[N, d_in]`` (safe / unsafe) falls in the top directions of the
    change ``delta [d_out, d_in]`` of ``weight`` (module docstring)."""
    basis, r, s = top_directions(delta, energy)
    d_in = delta.shape[1]

    def share(a: Tensor) -> float:
        a = a.float()
        if r == 0:
            return 0.0
        return float(((a @ basis.T).pow(2).sum(1) / a.pow(2).sum(1).clamp_min(1e-12)).mean())

    def output_change(a: Tensor) -> float:
        a = a.float()
        return float(((a @ delta.float().T).norm(dim=1) / (a @ weight.float().T).norm(dim=1).clamp_min(1e-12)).mean())

    return {
        "rank": r,
        "dim": d_in,
        "energy": energy,
        "chance": r / d_in,
        "share_safe": share(safe),
        "share_unsafe": share(unsafe),
        # what tells the two classes apart: the unsafe mean minus the safe mean
        "share_difference": share((unsafe.float().mean(0) - safe.float().mean(0))[None]),
        "output_change_safe": output_change(safe),
        "output_change_unsafe": output_change(unsafe),
        "relative_change": float(delta.norm() / weight.norm().clamp_min(1e-12)),
    }


def mlp_null_space(
    original: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    tower: str,
    acts_safe: Mapping[str, Tensor],
    acts_unsafe: Mapping[str, Tensor],
    energy: float = 0.9,
) -> list[dict[str, Any]]:
    """:func:`null_space_share` for every MLP matrix of a tower. ``acts_*``: ``{"mlp_in": [N,
    layers, D], "mlp_hidden": [N, layers, 4D]}``, the inputs of ``c_fc`` and ``c_proj``."""
    prefix = TOWER_PREFIX[tower]
    rows = []
    for layer in range(_num_blocks(original, tower)):
        for kind, name in MLP_MATRICES.items():
            key = f"{prefix}{layer}.{name}"
            w0, w1 = original[key].float(), tuned[key].float()
            result = null_space_share(w0, w1 - w0, acts_safe[kind][:, layer], acts_unsafe[kind][:, layer], energy)
            rows.append({"layer": layer, "matrix": name.removesuffix(".weight"), **result})
    return rows


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def pca_basis(X: Tensor) -> tuple[Tensor, Tensor]:
    """The 2-D PCA axes ``[2, D]`` and mean ``[D]`` of ``X [N, D]``."""
    return pca(X, 2)


def project_2d(
    sets: Mapping[str, Tensor], basis: tuple[Tensor, Tensor] | None = None, method: str = "pca", seed: int = 0
) -> tuple[dict[str, Tensor], str]:
    """2-D coordinates ``[N_i, 2]`` of each ``sets[name] [N_i, D]`` and the method used.

    ``pca``: onto ``basis`` (:func:`pca_basis` of the original model's embeddings, so every
    model's picture shares axes), or a basis fitted on the sets themselves. ``umap``: one UMAP
    fitted on the sets (when ``umap-learn`` is installed, else PCA; axes are then per model)."""
    if method not in ("pca", "umap"):
        raise ConfigError(f"projection must be pca or umap, got {method!r}")
    names = list(sets)
    stacked = torch.cat([sets[n].float() for n in names])
    if method == "umap" and umap_available():
        import numpy as np
        import umap  # type: ignore[import-not-found]

        coords = torch.from_numpy(
            np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(stacked.numpy()))
        ).float()
        used = "umap"
    else:
        axes, mean = basis if basis is not None else pca_basis(stacked)
        coords, used = (stacked - mean) @ axes.T, "pca"
    out, start = {}, 0
    for n in names:
        out[n] = coords[start : start + len(sets[n])]
        start += len(sets[n])
    return out, used

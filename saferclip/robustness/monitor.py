"""A safety monitor built on what the model computes anyway (the coverage monitor of
:mod:`.coverage` is the baseline it is compared with).

Per tower (``text`` for caption inputs, ``image`` for image inputs), up to three signals, each
a number per input, higher = more likely unsafe or adversarial:

* ``bank`` — Latent Guard's idea, in the model's own embedding space: how much nearer the
  input's embedding is to unsafe reference items than to safe ones (mean of the ``k`` best
  scores against the model's embeddings of the training split's unsafe items, minus the same
  against the safe ones; scores in the model's geometry, no traversal), once against the
  caption bank and once against the image bank (two columns: a query is judged in the space
  it retrieves from as well as in its own). An attack that makes an input retrieve unsafe
  content has to move its embedding next to unsafe content, and the bank sits there;
* ``origin`` — HySAC only: the distance from the origin (unsafe content lies farther out);
* ``head`` — the one-head detector (:mod:`saferclip.analysis.detector`): the best attention
  head's value at the pooled token, projected on the direction that separates unsafe from
  safe training inputs. It reads the input before the last blocks, where fine-tuning may not
  have hidden the unsafe concept.

Each signal is standardised (median and interquartile range) on one half of clean *safe*
validation inputs; the monitor's score is the largest standardised signal, and its threshold
the split-conformal quantile for the target false-positive rate (5%) on the other half. A
false positive is a clean safe input flagged; a clean unsafe input flagged is a detection.

Reading the head costs one hook on one attention block (:func:`reading_head`), the bank one
matrix product: what ``scripts/bench_monitor.py`` measures against the forward pass. Every
signal is differentiable in the input, so an attacker that knows the monitor can optimise
against it (:mod:`.suite`'s adaptive variants do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.detector import calibrate_head_detector, labelled_activations
from ..analysis.heads import activations, pooled_text_positions, tower_transformer
from ..analysis.stats import calibrate_threshold, stratified_halves
from ..model import lorentz
from ..model.similarity import LorentzSimilarity, Similarity

SIGNALS = ("bank", "origin", "head")


def pairwise_scores(similarity: Similarity, a: Tensor, b: Tensor) -> Tensor:
    """``[Na, Nb]`` the model's similarity of embeddings, with no traversal (the monitor looks
    at an input where the model put it)."""
    if isinstance(similarity, LorentzSimilarity):
        return -lorentz.pairwise_distance(a.float(), b.float(), similarity.curvature)
    return a.float() @ b.float().T


@dataclass
class SafetyMonitor:
    """One tower's monitor (module docstring). Tensors: ``bank [M, D]``, ``bank_unsafe [M]``,
    ``bank_text [M]`` (a caption's embedding, else an image's), ``direction [d_head]`` (with
    ``head``: ``(layer, head)``), ``center``, ``scale`` ``[columns]``."""

    tower: str
    similarity: Similarity
    signals: tuple[str, ...]
    bank: Tensor
    bank_unsafe: Tensor
    bank_text: Tensor
    k: int = 5
    head: tuple[int, int] | None = None
    direction: Tensor | None = None
    center: Tensor = field(default_factory=lambda: torch.zeros(0))
    scale: Tensor = field(default_factory=lambda: torch.ones(0))
    threshold: float = math.inf
    target_fpr: float = 0.05
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the bank split once into (unsafe, safe) blocks per modality: two small products per
        # block, no masked copies per call (the monitor's cost is per forward pass)
        self._blocks = [
            (
                self.bank[self.bank_unsafe & m].float().contiguous(),
                self.bank[~self.bank_unsafe & m].float().contiguous(),
            )
            for m in (self.bank_text, ~self.bank_text)
            if m.any()
        ]

    def columns(self) -> list[str]:
        """What each column of :meth:`signal_values` is."""
        out = []
        for signal in self.signals:
            if signal == "bank":
                out += [
                    f"bank_{m}"
                    for m, present in (("text", self.bank_text.any()), ("image", (~self.bank_text).any()))
                    if present
                ]
            else:
                out.append(signal)
        return out

    def signal_values(self, embeddings: Tensor, head: Tensor | None = None) -> Tensor:
        """``[N, columns]`` the raw signals of inputs' embeddings ``[N, D]`` (and head values ``[N, d_head]``)."""
        columns = []
        for signal in self.signals:
            if signal == "bank":
                for unsafe, safe in self._blocks:
                    k = min(self.k, len(unsafe), len(safe))
                    near = [
                        pairwise_scores(self.similarity, embeddings, b.to(embeddings.device))
                        .topk(k, dim=1)
                        .values.mean(1)
                        for b in (unsafe, safe)
                    ]
                    columns.append(near[0] - near[1])
            elif signal == "origin":
                columns.append(lorentz.distance_from_origin(embeddings.float(), self.similarity.curvature))
            elif signal == "head":
                if head is None:
                    raise ValueError("this monitor reads a head: pass the head values (reading_head)")
                columns.append(head.float() @ self.direction.to(head.device))
        return torch.stack(columns, dim=1)

    def scores(self, embeddings: Tensor, head: Tensor | None = None) -> Tensor:
        """``[N]`` the largest standardised signal."""
        values = self.signal_values(embeddings, head)
        return ((values - self.center.to(values)) / self.scale.to(values)).amax(1)

    def flags(self, embeddings: Tensor, head: Tensor | None = None) -> Tensor:
        return self.scores(embeddings, head) > self.threshold

    def describe(self) -> dict[str, Any]:
        return {
            "tower": self.tower,
            "signals": list(self.signals),
            "columns": self.columns(),
            "bank_items": len(self.bank),
            "bank_unsafe": int(self.bank_unsafe.sum()),
            "k": self.k,
            "head": list(self.head) if self.head else None,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "calibration": self.calibration,
        }


# ----------------------------------------------------------------------------- reading the head
@contextmanager
def reading_head(model: nn.Module, tower: str, layer: int | None, head: int | None) -> Iterator[list[Tensor]]:
    """While active, every forward of ``tower`` appends the chosen head's value at the pooled
    token ``[B, d_head]`` to the yielded list, *with* gradients (an attacker differentiates
    through it). ``layer=None``: nothing is read (a monitor without the head signal)."""
    store: list[Tensor] = []
    if layer is None:
        yield store
        return
    transformer = tower_transformer(model, tower)
    batch_first = getattr(transformer, "batch_first", True)
    attn = transformer.resblocks[layer].attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"block {layer} of the {tower} tower has no nn.MultiheadAttention to read")
    positions: list[Tensor] = []
    handles = []
    if tower == "text":
        handles.append(
            model.token_embedding.register_forward_pre_hook(
                lambda m, a: positions.append(pooled_text_positions(model, a[0]))
            )
        )

    def on_attn(module, args, kwargs):
        x = args[0] if batch_first else args[0].transpose(0, 1)
        where = positions[-1] if tower == "text" else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        mask = kwargs.get("attn_mask")
        mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.float())
        store.append(one_head_value(attn, x.float(), where.to(x.device), mask, head))

    handles.append(attn.register_forward_pre_hook(on_attn, with_kwargs=True))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def one_head_value(
    attn: nn.MultiheadAttention, x: Tensor, positions: Tensor, attn_mask: Tensor | None, head: int
) -> Tensor:
    """Head ``head``'s attention output at one query position per item ``[B, d_head]`` (what
    :func:`saferclip.analysis.heads.head_values` gives for every head, computed for one: only
    its slices of the query, key and value projections)."""
    b, length, d = x.shape
    dh = attn.head_dim
    rows = slice(head * dh, (head + 1) * dh)
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    if w is not None:
        wq, wk, wv = w[:d][rows], w[d : 2 * d][rows], w[2 * d :][rows]
    else:  # separate projections (kdim / vdim differ from the embedding width)
        wq, wk, wv = attn.q_proj_weight[rows], attn.k_proj_weight[rows], attn.v_proj_weight[rows]
    bq, bk, bv = (None, None, None) if bias is None else (bias[:d][rows], bias[d : 2 * d][rows], bias[2 * d :][rows])
    q = torch.nn.functional.linear(x[torch.arange(b, device=x.device), positions], wq, bq)  # [B, dh]
    k, v = torch.nn.functional.linear(x, wk, bk), torch.nn.functional.linear(x, wv, bv)  # [B, L, dh]
    scores = torch.einsum("bd,bld->bl", q, k) / math.sqrt(dh)
    if attn_mask is not None:
        mask = attn_mask[positions] if attn_mask.dim() == 2 else attn_mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    return torch.einsum("bl,bld->bd", scores.softmax(dim=-1), v)


def monitored(
    monitor: SafetyMonitor, model: nn.Module, encode: Callable[[Any], Tensor]
) -> Callable[[Any], tuple[Tensor, Tensor]]:
    """``f(inputs) -> (embeddings [N, D], monitor scores [N])``: ``encode`` (the model's own
    encoder of the monitor's tower) run once with the head read (differentiable)."""
    layer, index = monitor.head if monitor.head else (None, None)

    def run(inputs: Any) -> tuple[Tensor, Tensor]:
        with reading_head(model, monitor.tower, layer, index) as store:
            embeddings = encode(inputs)
        head = torch.cat(store) if store else None
        return embeddings, monitor.scores(embeddings, head)

    return run


# ----------------------------------------------------------------------------- calibration
def fit_monitor(
    bundle,
    tower: str,
    labelled: tuple[Sequence[Any], Sequence[Any]],
    bank: tuple[Tensor, Tensor, Tensor],
    clean_safe: Sequence[Any],
    signals: Sequence[str] | None = None,
    k: int = 5,
    target_fpr: float = 0.05,
    seed: int = 0,
    batch_size: int = 256,
    head_layers: Sequence[int] | None = None,
) -> SafetyMonitor:
    """The monitor of one tower.

    ``labelled``: (safe, unsafe) training inputs of the tower (captions or image files): the
    head and its direction (:func:`saferclip.analysis.detector.calibrate_head_detector`);
    ``bank``: (embeddings ``[M, D]`` in the model's geometry, unsafe ``[M]``, caption ``[M]``); ``clean_safe``:
    validation inputs, standardisation on one half, threshold on the other. ``signals``:
    default every one that applies (``origin`` for a HySAC model only); ``head_layers``: the
    blocks the head may come from (default all)."""
    hyperbolic = isinstance(bundle.similarity, LorentzSimilarity)
    signals = tuple(signals or [s for s in SIGNALS if s != "origin" or hyperbolic])
    bad = [s for s in signals if s not in SIGNALS or (s == "origin" and not hyperbolic)]
    if bad or not signals:
        raise ValueError(
            f"monitor signals must be some of {SIGNALS} ('origin' for a HySAC model only), got {list(signals)}"
        )
    similarity = bundle.similarity.with_mode("moderation") if hyperbolic else bundle.similarity
    monitor = SafetyMonitor(
        tower,
        similarity,
        signals,
        bank[0].float(),
        torch.as_tensor(bank[1], dtype=torch.bool),
        torch.as_tensor(bank[2], dtype=torch.bool),
        k,
        target_fpr=target_fpr,
    )
    calibration: dict[str, Any] = {
        "labelled": [len(labelled[0]), len(labelled[1])],
        "clean_safe": len(clean_safe),
        "seed": seed,
    }
    if "head" in signals:
        layers = None if head_layers is None else sorted(int(i) for i in head_layers)
        safe, unsafe = (
            activations(bundle, tower, list(items), ("heads",), batch_size, layers=layers) for items in labelled
        )
        X, y = labelled_activations(safe.heads, unsafe.heads)
        detector, _ = calibrate_head_detector(X, y, tower, target_fpr, seed=seed)
        layer = int(detector.layer) if layers is None else layers[int(detector.layer)]
        monitor.head, monitor.direction = (layer, int(detector.head)), detector.direction.float()
        calibration["head_out_of_fold_auc"] = detector.calibration.get("out_of_fold_auc")
    clean = activations(bundle, tower, list(clean_safe), ("heads",) if "head" in signals else (), batch_size)
    head = clean.heads[:, monitor.head[0], monitor.head[1]] if monitor.head else None
    calibrate_monitor(monitor, monitor.signal_values(clean.final, head), target_fpr, seed)
    monitor.calibration = {**calibration, **monitor.calibration}
    return monitor


def calibrate_monitor(monitor: SafetyMonitor, values: Tensor, target_fpr: float = 0.05, seed: int = 0) -> SafetyMonitor:
    """Standardise the signals ``values [N, S]`` of clean safe inputs on one half (median,
    interquartile range) and set the threshold for ``target_fpr`` on the other (the
    split-conformal quantile of the largest standardised signal). In place; returned."""
    if len(values) < 4:
        raise ValueError(f"calibration needs at least 4 clean safe inputs, got {len(values)}")
    first, second = stratified_halves(torch.zeros(len(values), dtype=torch.bool), seed)
    q = values[first].quantile(torch.tensor([0.25, 0.5, 0.75]), dim=0)
    monitor.center, monitor.scale = q[1], (q[2] - q[0]).clamp_min(1e-6)
    held = ((values[second] - monitor.center) / monitor.scale).amax(1)
    monitor.threshold, monitor.target_fpr = calibrate_threshold(held, target_fpr), target_fpr
    monitor.calibration = {
        **monitor.calibration,
        "threshold_half_fpr": float((held > monitor.threshold).float().mean()),
        "num_standardise": int(first.sum()),
        "num_threshold": int(second.sum()),
    }
    return monitor

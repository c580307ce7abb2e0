"""A coverage monitor (after "Increasing the Confidence of Deep Neural Networks by Coverage
Analysis"): flags inputs whose activations leave what the model saw in training.

**Profile.** On the training split, each watched *neuron* of a tower — every hidden unit of
the chosen blocks' MLPs (``mlp.c_proj``'s input) at the pooled token, read by the hooks of
:mod:`saferclip.analysis.heads`, for images also their maximum over all tokens, plus every
coordinate of the final embedding — gets its range ``[low, high]``, a ``k``-multisection
histogram of that range (the share of training inputs in each of ``k`` equal sections) and
how often it is among the ``top_k`` most active neurons of its layer.

**Score.** Four detection logics per input, each "how far from training it is":

* ``outside_share`` — the share of neurons outside their range (neuron-boundary coverage:
  how often);
* ``outside_distance`` — the mean distance outside the range, in units of the range (how far);
* ``section_rarity`` — the mean ``−log`` training share of the section each neuron falls in
  (k-multisection coverage; outside the range counts as an empty section);
* ``topk_rarity`` — the mean ``−log`` training frequency of the input's top-k neurons, per
  layer (top-k neuron patterns).

Each logic is standardised (median and interquartile range on one half of the clean
calibration inputs); the monitor's score is the largest standardised logic (an input is
flagged when any logic finds it unusual), and its threshold is the split-conformal quantile
for the target false-positive rate on the other half. Smoothing: a share is ``(count + 1) /
(n + 2)``.

A :class:`CoverageMonitor` saves to a safetensors file with a checksummed JSON header (the
detector files' scheme, :mod:`saferclip.analysis.detector`); ``saferclip-detect`` reads either kind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..analysis.detector import content_checksum
from ..analysis.heads import Activations
from ..analysis.stats import calibrate_threshold, stratified_halves
from ..integrity import DamagedArtefact
from ..model.checkpoints import CheckpointError, save_state_dict

FORMAT = "saferclip-coverage-monitor"
FORMAT_VERSION = 1
LOGICS = ("outside_share", "outside_distance", "section_rarity", "topk_rarity")
KINDS = ("mlp_hidden",)  # what the monitor records (besides the final embedding)


def neurons(acts: Activations, layers: Sequence[int] | None = None) -> tuple[Tensor, list[int]]:
    """The watched neurons ``[N, n]`` of recorded activations (``mlp_hidden`` of the recorded
    layers, then the final embedding) and the size of each layer group."""
    parts = []
    if acts.mlp_hidden is not None:
        count = acts.mlp_hidden.shape[1]
        parts += [acts.mlp_hidden[:, i] for i in range(count)]
    token_mean = getattr(acts, "token_mean", None)
    if token_mean is not None:
        parts += [token_mean[:, i] for i in range(token_mean.shape[1])]
    parts.append(acts.final)
    return torch.cat(parts, dim=1).float(), [p.shape[1] for p in parts]


def _share(count: Tensor, n: int) -> Tensor:
    return (count.float() + 1) / (n + 2)


@dataclass
class CoverageMonitor:
    """The profile of one tower (module docstring). Tensors: ``low``, ``high``,
    ``topk_share`` ``[n]``; ``section_share`` ``[n, sections]``; ``center``, ``scale`` ``[4]``."""

    tower: str
    layers: list[int]
    groups: list[int]
    low: Tensor
    high: Tensor
    section_share: Tensor
    topk_share: Tensor
    top_k: int
    center: Tensor = field(default_factory=lambda: torch.zeros(len(LOGICS)))
    scale: Tensor = field(default_factory=lambda: torch.ones(len(LOGICS)))
    threshold: float = math.inf
    target_fpr: float = 0.05
    num_train: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    kind = "coverage"

    @property
    def sections(self) -> int:
        return int(self.section_share.shape[1])

    # ------------------------------------------------------------------ scoring
    def logics(self, x: Tensor) -> Tensor:
        """The four detection logics ``[N, 4]`` of watched neurons ``x [N, n]``."""
        if x.shape[1] != len(self.low):
            raise ValueError(f"{x.shape[1]} neurons given, the {self.tower} monitor watches {len(self.low)}")
        width = (self.high - self.low).clamp_min(1e-6)
        below, above = x < self.low, x > self.high
        outside = below | above
        distance = ((self.low - x).clamp_min(0) + (x - self.high).clamp_min(0)) / width
        section = ((x - self.low) / width * self.sections).long().clamp(0, self.sections - 1)
        share = self.section_share.gather(1, section.T).T  # [N, n]
        empty = 1.0 / (self.num_train + 2)
        rarity = -torch.where(outside, torch.full_like(share, empty), share).log()
        topk = []
        start = 0
        for size in self.groups:
            k = min(self.top_k, size)
            idx = x[:, start : start + size].topk(k, dim=1).indices + start
            topk.append(-self.topk_share[idx].log().mean(1))
            start += size
        return torch.stack(
            [outside.float().mean(1), distance.mean(1), rarity.mean(1), torch.stack(topk, 1).mean(1)], dim=1
        )

    def scores(self, x: Tensor) -> Tensor:
        """``[N]`` the largest standardised logic (higher = farther from training)."""
        return ((self.logics(x) - self.center) / self.scale).amax(1)

    def flags(self, x: Tensor) -> Tensor:
        return self.scores(x) > self.threshold

    def describe(self) -> dict[str, Any]:
        return {
            "tower": self.tower,
            "kind": self.kind,
            "layers": self.layers,
            "groups": self.groups,
            "top_k": self.top_k,
            "sections": self.sections,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "num_train": self.num_train,
            "num_neurons": len(self.low),
            "calibration": self.calibration,
            "model": self.model,
        }

    def nbytes(self) -> int:
        """Memory of the profile's tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, Tensor]:
        return {
            "low": self.low,
            "high": self.high,
            "section_share": self.section_share,
            "topk_share": self.topk_share,
            "center": self.center,
            "scale": self.scale,
        }


def profile(
    x: Tensor, groups: Sequence[int], tower: str, layers: Sequence[int], sections: int = 10, top_k: int = 10
) -> CoverageMonitor:
    """The training profile of watched neurons ``x [N, n]`` (module docstring); uncalibrated."""
    if len(x) < 2:
        raise ValueError(f"a coverage profile needs at least 2 training inputs, got {len(x)}")
    if sections < 1 or top_k < 1:
        raise ValueError(f"sections and top_k must be >= 1, got {sections}, {top_k}")
    n = len(x)
    low, high = x.min(0).values, x.max(0).values
    width = (high - low).clamp_min(1e-6)
    section = ((x - low) / width * sections).long().clamp(0, sections - 1)
    counts = torch.zeros(x.shape[1], sections).scatter_add_(1, section.T, torch.ones_like(section.T, dtype=torch.float))
    top = torch.zeros(x.shape[1])
    start = 0
    for size in groups:
        idx = x[:, start : start + size].topk(min(top_k, size), dim=1).indices + start
        top += torch.bincount(idx.flatten(), minlength=x.shape[1]).float()
        start += size
    return CoverageMonitor(
        tower, list(layers), list(groups), low, high, _share(counts, n), _share(top, n), top_k, num_train=n
    )


def calibrate(monitor: CoverageMonitor, clean: Tensor, target_fpr: float = 0.05, seed: int = 0) -> CoverageMonitor:
    """Standardise the logics on one half of the clean inputs ``clean [N, n]`` and set the
    threshold for ``target_fpr`` on the other half (module docstring). In place; returned."""
    if len(clean) < 4:
        raise ValueError(f"calibration needs at least 4 clean inputs, got {len(clean)}")
    first, second = stratified_halves(torch.zeros(len(clean), dtype=torch.bool), seed)
    logics = monitor.logics(clean[first])
    q = logics.quantile(torch.tensor([0.25, 0.5, 0.75]), dim=0)
    monitor.center = q[1]
    monitor.scale = (q[2] - q[0]).clamp_min(1e-6)
    held = monitor.scores(clean[second])
    monitor.threshold = calibrate_threshold(held, target_fpr)
    monitor.target_fpr = target_fpr
    monitor.calibration = {
        "num_clean": len(clean),
        "num_standardise": int(first.sum()),
        "num_threshold": int(second.sum()),
        "seed": seed,
        "threshold_half_fpr": float((held > monitor.threshold).float().mean()),
    }
    return monitor


# ----------------------------------------------------------------------------- files
def save_monitors(
    path: str | os.PathLike,
    monitors: Mapping[str, CoverageMonitor],
    force: bool = False,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write coverage monitors (tower -> monitor) to one safetensors file with a checksummed
    JSON header. Atomic; an existing file is replaced only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force to replace it")
    if not monitors:
        raise ValueError("no monitor to save")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "monitors": {t: m.describe() for t, m in monitors.items()},
        **dict(info or {}),
    }
    tensors = {
        f"{t}.{name}": v.detach().float().contiguous().cpu()
        for t, m in monitors.items()
        for name, v in m._tensors().items()
    }
    text = json.dumps(header, default=str)
    metadata = {"format": FORMAT, "saferclip_monitor": text, "saferclip_checksum": content_checksum(text, tensors)}
    save_state_dict(tensors, path, metadata=metadata)
    return path


def file_format(path: str | os.PathLike) -> str | None:
    """The ``format`` a saferclip safetensors file records (None: none, or not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def load_monitors(path: str | os.PathLike) -> dict[str, CoverageMonitor]:
    """Read a file written by :func:`save_monitors` (safetensors and JSON only; no pickle); a
    file whose bytes changed since it was written is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"coverage monitor file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a saferclip coverage monitor file (not readable as safetensors: {e})"
        ) from None
    if metadata.get("format") != FORMAT or "saferclip_monitor" not in metadata:
        raise CheckpointError(f"{path}: not a saferclip coverage monitor file (its metadata has no '{FORMAT}' header)")
    if metadata.get("saferclip_checksum") != content_checksum(metadata["saferclip_monitor"], tensors):
        raise DamagedArtefact(
            path,
            "coverage monitor: checksum mismatch, its content changed since it was saved; refusing to use it (recalibrate it with saferclip-attack)",
        )
    header = json.loads(metadata["saferclip_monitor"])
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: coverage monitor format version {header.get('version')!r}; this saferclip reads version {FORMAT_VERSION}"
        )
    out = {}
    for tower, d in (header.get("monitors") or {}).items():
        try:
            t = {
                name: tensors[f"{tower}.{name}"].float()
                for name in ("low", "high", "section_share", "topk_share", "center", "scale")
            }
            m = CoverageMonitor(
                tower=str(d["tower"]),
                layers=[int(i) for i in d["layers"]],
                groups=[int(g) for g in d["groups"]],
                top_k=int(d["top_k"]),
                threshold=float(d["threshold"]),
                target_fpr=float(d["target_fpr"]),
                num_train=int(d["num_train"]),
                calibration=dict(d.get("calibration") or {}),
                model=dict(d.get("model") or {}),
                **t,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: coverage monitor {tower!r}: missing or invalid field {e}") from None
        if sum(m.groups) != len(m.low) or m.section_share.shape[0] != len(m.low) or not math.isfinite(m.threshold):
            raise CheckpointError(f"{path}: coverage monitor {tower!r}: inconsistent shapes or a non-finite threshold")
        out[tower] = m
    if not out:
        raise CheckpointError(f"{path}: the file holds no coverage monitor")
    return out


# ----------------------------------------------------------------------------- watched neurons of inputs
@contextmanager
def token_means(model, tower: str, layers: Sequence[int]) -> Iterator[list[list[Tensor]]]:
    """Hooks keeping, per forward pass, each chosen block's MLP hidden units at their largest
    over all tokens ``[B, 4D]`` (image tower only: measured on the toy world, uniform-noise
    images stay inside the class token's ranges, while their patches' maxima leave them).
    Yields one list per layer, a batch appended per forward."""
    from ..analysis.heads import tower_transformer

    transformer = tower_transformer(model, tower)
    batch_first = getattr(transformer, "batch_first", True)
    store: list[list[Tensor]] = [[] for _ in layers]
    handles = []
    for slot, i in enumerate(layers):

        def hook(module, args, slot=slot):
            h = args[0] if batch_first else args[0].transpose(0, 1)
            store[slot].append(h.float().amax(1).detach().cpu())

        handles.append(transformer.resblocks[i].mlp.c_proj.register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def with_token_means(acts: Activations, store: list[list[Tensor]]) -> Activations:
    acts.token_mean = torch.stack([torch.cat(per_layer) for per_layer in store], dim=1) if store else None
    return acts


def watched_inputs(
    bundle, tower: str, inputs: Sequence[Any], layers: Sequence[int] | None = None, batch_size: int = 256
) -> Tensor:
    """Watched neurons ``[N, n]`` of captions (``tower="text"``) or image files, encoded as
    the evaluation encodes them."""
    return watched_with_groups(bundle, tower, inputs, layers, batch_size)[0]


def watched_with_groups(
    bundle, tower: str, inputs: Sequence[Any], layers: Sequence[int] | None = None, batch_size: int = 256
) -> tuple[Tensor, list[int]]:
    """:func:`watched_inputs` and the size of each watched group."""
    from ..analysis.heads import activations, tower_blocks

    layers = list(range(len(tower_blocks(bundle.model, tower)))) if layers is None else list(layers)
    with token_means(bundle.model, tower, layers if tower == "image" else []) as store:
        acts = activations(bundle, tower, list(inputs), KINDS, batch_size, layers=layers)
    return neurons(with_token_means(acts, store))


def watched_pixels(bundle, pixels: Tensor, layers: Sequence[int] | None = None, batch_size: int = 256) -> Tensor:
    """Watched neurons ``[N, n]`` of images given as pixels ``[N, 3, H, W]`` in ``[0, 1]``
    (normalised as the model's preprocessing does; the final embedding as the evaluation's
    encoder gives it, so image files and pixel tensors are watched alike)."""
    from ..analysis.heads import recording, tower_blocks
    from ..model.build import eval_mode
    from .image_attacks import PixelModel

    layers = list(range(len(tower_blocks(bundle.model, "image")))) if layers is None else list(layers)
    target = PixelModel.of(bundle)
    parts = []
    with torch.no_grad(), eval_mode(bundle.model), recording(bundle.model, "image", KINDS, layers) as rec:
        for start in range(0, len(pixels), batch_size):
            with token_means(bundle.model, "image", layers) as store:
                final = target.embed(pixels[start : start + batch_size].to(next(bundle.model.parameters()).device))
            parts.append(neurons(with_token_means(rec.take(final), store))[0])
    return torch.cat(parts)

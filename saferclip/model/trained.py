"""Opening what training wrote: a Lightning checkpoint or a run folder, as a plain CLIP.

Lightning is not imported: a training checkpoint is read with
:func:`saferclip.model.checkpoints.load_torch_checkpoint` (``weights_only=True``; the module saves
only primitives as hyper-parameters), the LoRA structure is rebuilt from them, the weights
loaded, and the adapters merged. So evaluation and export need nothing but the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .adapters import TrainableConfig, configure_trainable, merge_adapters
from .build import ClipBundle, build_clip
from .checkpoints import CheckpointError, load_torch_checkpoint
from ..errors import ConfigError
from .hyperbolic import HyperbolicConfig, HyperbolicHead
from .similarity import LorentzSimilarity, Similarity

MODEL_PREFIX = "model."
HEAD_PREFIX = "head."  # a HySAC module's hyperbolic head

# A run folder, as saferclip-train writes it:
#   config_resolved.yaml   the run's config, every interpolation resolved
#   .hydra/config.yaml     Hydra's own copy (unresolved), .hydra/hydra.yaml its runtime
#   checkpoints/           the kept epoch (epochNN.ckpt) and last.ckpt
#   selection.json         every epoch's validation metrics and the kept epoch
#   csv/metrics.csv, export/, report/
RESOLVED_CONFIG = Path("config_resolved.yaml")
RUN_CONFIG = Path(".hydra") / "config.yaml"
SELECTION_FILE = Path("selection.json")
SAFE_RADII_FILE = Path("safe_radii.json")  # HySAC: the safe radii, computed after training


def read_safe_radii(run_dir: str | Path | None) -> dict[str, float] | None:
    """A HySAC run's safe radii ``{"text", "image", "percentile"}``, None if it has none yet."""
    import json
    import math

    if run_dir is None:
        return None
    path = Path(run_dir) / SAFE_RADII_FILE
    if not path.is_file():
        return None
    try:
        radii = json.loads(path.read_text())
        values = {k: float(radii[k]) for k in ("text", "image")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable safe radii ({e}); delete it to have them computed again") from None
    if not all(math.isfinite(v) and v > 0 for v in values.values()):
        raise CheckpointError(f"{path}: safe radii must be finite and > 0, got {values}")
    return {**radii, **values}


def read_selection(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``selection.json`` (validation history and the kept epoch), None if it has none."""
    import json

    path = Path(run_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); delete it or rerun the training") from None


def find_run_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run folder (``checkpoints/*.ckpt`` other than last.ckpt), else last.ckpt."""
    folder = run_dir / "checkpoints"
    best = sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise FileNotFoundError(f"{run_dir}: no checkpoints/*.ckpt in this run folder")


def read_training_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint dict of a saferclip training checkpoint (or a run folder's best),
    with ``"_path"`` set to the file read. Raises FileNotFoundError for a missing path or a
    folder without checkpoints, :class:`CheckpointError` for a file that is truncated, foreign,
    needs pickle, or is not a saferclip training checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = find_run_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    ckpt = load_torch_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        found = ", ".join(map(str, list(ckpt)[:8])) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a saferclip training checkpoint (no state_dict / hyper_parameters; found: {found})"
        )
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, Mapping) or "arch" not in hp or not isinstance(hp.get("method"), Mapping):
        raise CheckpointError(f"{path}: not a saferclip training checkpoint (its hyper-parameters lack arch / method)")
    ckpt = dict(ckpt)
    ckpt["_path"] = str(path)
    return ckpt


def load_trained_model(path: str | Path, device: str = "cpu") -> ClipBundle:
    """A saferclip Lightning checkpoint (or run folder) as a plain, merged open_clip model."""
    return trained_model_from_checkpoint(read_training_checkpoint(path), device)


def trained_model_from_checkpoint(ckpt: Mapping[str, Any], device: str = "cpu", *, merge: bool = True) -> ClipBundle:
    """:func:`load_trained_model` from a checkpoint dict already read by :func:`read_training_checkpoint`.

    ``merge=False`` leaves the LoRA parametrizations in place (the model as it trained), for
    a caller that merges itself (:func:`saferclip.export.open_clip.export_open_clip`)."""
    hp = ckpt["hyper_parameters"]
    arch, method = hp["arch"], hp["method"]
    bundle = build_clip(arch, None)
    trainable = dict(method.get("trainable") or {})
    trainable["towers"] = tuple(trainable.get("towers", ("text", "image")))
    configure_trainable(bundle.model, TrainableConfig(**trainable))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = bundle.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt['_path']}: weights do not fit {arch} with {trainable.get('mode')} adapters "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]})"
        )
    if merge:
        merge_adapters(bundle.model, inplace=True)
    bundle.model.requires_grad_(False).eval().to(device)
    bundle.source = ckpt["_path"]
    if isinstance(method.get("hyperbolic"), Mapping):
        bundle.similarity = _hyperbolic_similarity(ckpt, bundle, method["hyperbolic"])
    return bundle


def _hyperbolic_similarity(ckpt: Mapping[str, Any], bundle: ClipBundle, section: Mapping[str, Any]):
    """A HySAC checkpoint's geometry: its head's learnt values, and the safe radii of its run
    folder when computed (safe mode), else moderation mode."""
    dim = int(bundle.model_cfg.get("embed_dim") or 0)
    head = HyperbolicHead(dim or 1, HyperbolicConfig.from_mapping(section))
    state = {k[len(HEAD_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(HEAD_PREFIX)}
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt['_path']}: a HySAC checkpoint without a valid hyperbolic head ({str(e).splitlines()[0]})") from None
    path = Path(ckpt["_path"])
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    radii = read_safe_radii(run_dir)
    return head.similarity(radii, mode="safe" if radii else "moderation")


def is_training_checkpoint(pretrained: str | Path | None) -> bool:
    if pretrained is None:
        return False
    p = Path(str(pretrained))
    return p.suffix == ".ckpt" or (p.is_dir() and (p / "checkpoints").is_dir())


def load_model(arch: str | None, pretrained: str | Path | None, device: str = "cpu", mode: str | None = None) -> ClipBundle:
    """Any model a user can name: a training checkpoint or run folder, an exported folder, a
    weights file, an open_clip tag, or random init (``pretrained=None``).

    ``mode``: for a hyperbolic (HySAC) model, ``safe`` (queries traversed to the safe radius;
    the default where the radii exist) or ``moderation`` (no traversal). A Euclidean model has
    no modes: asking for one is an error."""
    if is_training_checkpoint(pretrained):
        bundle = load_trained_model(pretrained, device)
        if arch is not None and bundle.arch != arch:
            raise CheckpointError(f"{pretrained}: holds a {bundle.arch} model, but {arch} was asked for")
    else:
        bundle = build_clip(arch, pretrained, device=device)
    if mode is not None:
        bundle.similarity = with_mode(bundle.similarity, mode, pretrained)
    return bundle


def with_mode(similarity: Similarity, mode: str, what: Any = None) -> Similarity:
    """``similarity`` in ``mode`` (safe / moderation); a Euclidean model has no traversal."""
    if not isinstance(similarity, LorentzSimilarity):
        raise ConfigError(
            f"mode={mode!r}: {what or 'this model'} is a Euclidean CLIP ({similarity.kind} similarity); "
            "only a hyperbolic (HySAC) model has a safe / moderation mode"
        )
    return similarity.with_mode(mode)

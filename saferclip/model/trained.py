"""Opening what training wrote: a Lightning checkpoint or a run folder, as a plain CLIP.

Lightning is not imported: a training checkpoint is read with
:func:`saferclip.model.checkpoints.load_torch_checkpoint` (``weights_only=True``; the module saves
only primitives as hyper-parameters), the LoRA structure is rebuilt from them, the weights
loaded, and the adapters merged. So evaluation and export need nothing but the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .adapters import TrainableConfig, configure_trainable, merge_adapters
from .build import ClipBundle, build_clip
from .checkpoints import CheckpointError, load_torch_checkpoint
from .hyperbolic import HyperbolicConfig, HyperbolicHead
from .safe_radii import SAFE_RADII_FILE, CheckpointIdentity
from .similarity import LorentzSimilarity, Similarity

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
HEAD_PREFIX = "head."  # a HySAC module's hyperbolic head

# A run folder, as saferclip-train writes it:
#   config_resolved.yaml   the run's config, every interpolation resolved
#   .hydra/config.yaml     Hydra's own copy (unresolved), .hydra/hydra.yaml its runtime
#   checkpoints/           the kept epoch (epochNN.ckpt) and last.ckpt
#   selection.json         every epoch's validation metrics and the kept epoch
#   safe_radii.json        HySAC: each measured checkpoint's safe radii (saferclip.model.safe_radii)
#   csv/metrics.csv, export/, report/
RESOLVED_CONFIG = Path("config_resolved.yaml")
RUN_CONFIG = Path(".hydra") / "config.yaml"
SELECTION_FILE = Path("selection.json")
RADII_POLICIES = ("auto", "measure", "recorded", "none")


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


def load_trained_model(path: str | Path, device: str = "cpu", radii: str = "auto") -> ClipBundle:
    """A saferclip Lightning checkpoint (or run folder) as a plain, merged open_clip model
    (``radii``: see :func:`trained_model_from_checkpoint`)."""
    return trained_model_from_checkpoint(read_training_checkpoint(path), device, radii=radii)


def run_dir_of_checkpoint(path: str | Path) -> Path | None:
    """The run folder of a checkpoint in its ``<run>/checkpoints/`` folder (else None)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def trained_model_from_checkpoint(
    ckpt: Mapping[str, Any], device: str = "cpu", *, merge: bool = True, radii: str = "auto"
) -> ClipBundle:
    """:func:`load_trained_model` from a checkpoint dict already read by :func:`read_training_checkpoint`.

    ``merge=False`` leaves the LoRA parametrizations in place (the model as it trained), for
    a caller that merges itself (:func:`saferclip.export.open_clip.export_open_clip`).

    ``radii``, for a HySAC checkpoint (its geometry in safe mode needs the safe radii of *these*
    weights, :mod:`saferclip.model.safe_radii`): ``auto`` takes the radii recorded for this
    checkpoint in its run's ``safe_radii.json`` and measures (and records) them when there are
    none; when they cannot be measured (no run folder, no data config) the model is in
    moderation mode, with a one-line warning. ``measure`` is ``auto`` without that warning (the
    caller reports it: :func:`load_model` in safe mode refuses). ``recorded`` takes recorded
    radii only, silently; ``none`` none. ``bundle.provenance`` holds the record (``safe_radii``) or why there is none
    (``safe_radii_missing``)."""
    if radii not in RADII_POLICIES:
        raise ValueError(f"radii must be one of {RADII_POLICIES}, got {radii!r}")
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
        section = method["hyperbolic"]
        head = hyperbolic_head(ckpt, bundle, section)
        bundle.similarity = head.similarity()
        if radii != "none":
            _attach_radii(
                bundle, ckpt, head, float(HyperbolicConfig.from_mapping(section).traversal_percentile), radii, merge
            )
    return bundle


def hyperbolic_head(ckpt: Mapping[str, Any], bundle: ClipBundle, section: Mapping[str, Any]) -> HyperbolicHead:
    """A HySAC checkpoint's hyperbolic head, its learnt values loaded."""
    dim = int(bundle.model_cfg.get("embed_dim") or 0)
    head = HyperbolicHead(dim or 1, HyperbolicConfig.from_mapping(section))
    state = {k[len(HEAD_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(HEAD_PREFIX)}
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt['_path']}: a HySAC checkpoint without a valid hyperbolic head ({str(e).splitlines()[0]})"
        ) from None
    return head


def _attach_radii(
    bundle: ClipBundle, ckpt: Mapping[str, Any], head: HyperbolicHead, percentile: float, policy: str, merged: bool
) -> None:
    """The checkpoint's own safe radii (recorded, or measured now): safe mode; none: moderation."""
    from ..evaluation.hyperbolic import checkpoint_radii  # measuring needs the evaluation code

    run_dir = run_dir_of_checkpoint(ckpt["_path"])
    identity = CheckpointIdentity.of_checkpoint(ckpt, run_dir)
    # measured on the merged model, as evaluation encodes (the same numbers whoever measures)
    measuring = bundle if merged else replace(bundle, model=merge_adapters(bundle.model))
    record, missing = checkpoint_radii(measuring, identity, run_dir, percentile, measure=policy in ("auto", "measure"))
    if record is None:
        bundle.provenance["safe_radii_missing"] = missing
        if policy == "auto":
            log.warning("%s: loaded in moderation mode (no traversal)", missing)
        return
    bundle.provenance["safe_radii"] = record
    bundle.similarity = head.similarity(record, mode="safe")


def is_training_checkpoint(pretrained: str | Path | None) -> bool:
    if pretrained is None:
        return False
    p = Path(str(pretrained))
    return p.suffix == ".ckpt" or (p.is_dir() and (p / "checkpoints").is_dir())


def load_model(
    arch: str | None, pretrained: str | Path | None, device: str = "cpu", mode: str | None = None
) -> ClipBundle:
    """Any model a user can name: a training checkpoint or run folder, an exported folder, a
    weights file, an open_clip tag, or random init (``pretrained=None``).

    ``mode``: for a hyperbolic (HySAC) model, ``safe`` (queries traversed to the safe radius;
    the default where the radii exist) or ``moderation`` (no traversal). A Euclidean model has
    no modes: asking for one is an error."""
    if is_training_checkpoint(pretrained):
        # moderation mode needs no radii: none are measured for it
        bundle = load_trained_model(pretrained, device, radii={None: "auto", "safe": "measure"}.get(mode, "recorded"))
        if arch is not None and bundle.arch != arch:
            raise CheckpointError(f"{pretrained}: holds a {bundle.arch} model, but {arch} was asked for")
    else:
        bundle = build_clip(arch, pretrained, device=device)
    if mode is not None:
        bundle.similarity = with_mode(bundle.similarity, mode, pretrained, bundle.provenance.get("safe_radii_missing"))
    return bundle


def with_mode(similarity: Similarity, mode: str, what: Any = None, missing_radii: str | None = None) -> Similarity:
    """``similarity`` in ``mode`` (safe / moderation); a Euclidean model has no traversal.
    ``missing_radii``: why a HySAC checkpoint has no safe radii (the error names it)."""
    if not isinstance(similarity, LorentzSimilarity):
        raise ConfigError(
            f"mode={mode!r}: {what or 'this model'} is a Euclidean CLIP ({similarity.kind} similarity); "
            "only a hyperbolic (HySAC) model has a safe / moderation mode"
        )
    if mode == "safe" and missing_radii:
        raise ConfigError(
            f"mode='safe' needs the safe radii of {what}: {missing_radii}. Training records each checkpoint's in its "
            f"run's {SAFE_RADII_FILE} when it ends, and loading a checkpoint from its run's checkpoints/ folder measures "
            "them from the run's training split; load it from there (or its export, saferclip-export), or use mode=moderation"
        )
    return similarity.with_mode(mode)

"""Export what training produced: a training checkpoint, a run folder or the trained module.

:func:`export_checkpoint` rebuilds the model (LoRA structure from the checkpoint's
hyper-parameters), merges the adapters and writes open_clip's hub folder with
:func:`saferclip.export.open_clip.export_open_clip`, with a model card filled from the run:

* base model and method (with its whole config) from the hyper-parameters the training
  module saved (``arch``, ``pretrained``, ``method``);
* training data from the run's config (``data`` section of ``config_resolved.yaml`` or
  Hydra's ``.hydra/config.yaml``), when it has one;
* the evaluation table from the run's report (``report/results.json`` or ``results.md``,
  written by :func:`saferclip.evaluation.write_report`), or from ``evaluation``.

A run folder is ``<run>/checkpoints/{epochNN,last}.ckpt`` + ``<run>/.hydra/config.yaml``;
its best checkpoint is exported (:func:`saferclip.model.trained.find_run_checkpoint`).
Lightning is not imported: the checkpoint is read with ``weights_only=True``, and an
in-memory module is used through its ``.model`` and ``.hparams`` only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .. import locations
from ..errors import ConfigError
from ..files import occupied
from ..model.build import ClipBundle
from ..model.hyperbolic import save_head
from ..model.similarity import LorentzSimilarity
from ..model.checkpoints import CheckpointError
from ..model.trained import (
    HYDRA_CONFIG,
    RESOLVED_CONFIG,
    RUN_CONFIG,
    SELECTION_FILE,
    read_training_checkpoint,
    trained_model_from_checkpoint,
)
from .card import public_config, public_model_name, public_path, yaml_lines
from .open_clip import CONFIG_NAME, export_open_clip

log = logging.getLogger(__name__)

# the run's config: train.py's resolved copy, else Hydra's own (unresolved) one
# where a run keeps its evaluation report (saferclip.evaluation.report's file names)
REPORT_DIR, REPORT_JSON, REPORT_MARKDOWN = "report", "results.json", "results.md"
FORMATS = ("open_clip", "hf")


@dataclass
class TrainedModel:
    """What :func:`resolve_source` found: the model to export and where it came from."""

    model: nn.Module | ClipBundle
    arch: str
    hparams: dict[str, Any]
    checkpoint: Path | None = None
    run_dir: Path | None = None
    progress: dict[str, int] = field(default_factory=dict)  # epoch, global_step

    @property
    def method(self) -> dict[str, Any]:
        method = self.hparams.get("method")
        return dict(method) if isinstance(method, Mapping) else {}


# ---------------------------------------------------------------- the source


def _is_module_like(source: Any) -> bool:
    return isinstance(getattr(source, "model", None), nn.Module) and isinstance(getattr(source, "hparams", None), Mapping)


def _run_dir_of_checkpoint(path: Path) -> Path | None:
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _run_dir_of_module(module: Any) -> Path | None:
    """The run folder of a module attached to a trainer (train.py sets ``default_root_dir``)."""
    try:
        root = module.trainer.default_root_dir  # an unattached LightningModule raises here
    except Exception:
        return None
    root = Path(root) if root else None
    if root is not None and any((root / p).exists() for p in (RESOLVED_CONFIG, RUN_CONFIG, Path("checkpoints"))):
        return root
    return None


def resolve_source(source: Any, *, run_dir: str | os.PathLike | None = None) -> TrainedModel:
    """The model behind ``source``: a training checkpoint, a run folder (its best checkpoint)
    or an in-memory module with ``.model`` (the CLIP, adapters unmerged) and ``.hparams``.

    Raises FileNotFoundError (missing path, folder without checkpoints) or
    :class:`CheckpointError` (truncated, foreign or pickle-needing file; not a saferclip
    training checkpoint), each naming the path.
    """
    if _is_module_like(source):
        hparams = dict(source.hparams)
        if "arch" not in hparams:
            raise ValueError(f"{type(source).__name__}.hparams has no 'arch'; pass arch=")
        progress = {k: int(getattr(source, k)) for k in ("current_epoch", "global_step") if isinstance(getattr(source, k, None), int)}
        return TrainedModel(
            model=source.model,
            arch=hparams["arch"],
            hparams=hparams,
            run_dir=Path(run_dir) if run_dir else _run_dir_of_module(source),
            progress={"epoch" if k == "current_epoch" else k: v for k, v in progress.items()},
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a training checkpoint, a run folder or a module with .model and .hparams, "
            f"not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such training checkpoint or run folder")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path}: is already an exported open_clip folder (it has {CONFIG_NAME}), not a training run")
    ckpt = read_training_checkpoint(path)
    ckpt_path = Path(ckpt["_path"])
    bundle = trained_model_from_checkpoint(ckpt, merge=False)  # export_open_clip merges a copy
    hparams = dict(ckpt["hyper_parameters"])
    progress = {k: int(ckpt[k]) for k in ("epoch", "global_step") if isinstance(ckpt.get(k), int)}
    return TrainedModel(
        model=bundle,
        arch=hparams["arch"],
        hparams=hparams,
        checkpoint=ckpt_path,
        run_dir=Path(run_dir) if run_dir else (path if path.is_dir() else _run_dir_of_checkpoint(ckpt_path)),
        progress=progress,
    )


# ---------------------------------------------------------------- the run's config


LOCATION_RESOLVERS = {
    "saferclip_package:": lambda: locations.PACKAGE_DIR,
    "saferclip_home:": locations.home,
    "saferclip_cache:": locations.cache_dir,
}
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def _lookup(root: Any, dotted: str) -> Any:
    node = root
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _interpolate(value: Any, root: Mapping[str, Any], hydra: Mapping[str, Any], depth: int = 0) -> Any:
    """Resolve OmegaConf-style ``${a.b}`` references in config values read with plain YAML.

    Hydra stores the run's config unresolved. Without Hydra (this module must not import it)
    the references that matter for a card resolve here: other keys, ``${hydra:runtime.…}``
    (from ``.hydra/hydra.yaml``), ``${oc.env:VAR,default}`` and saferclip's location resolvers
    (``${saferclip_package:}``, ``${saferclip_home:}``, ``${saferclip_cache:}``).
    Anything else stays as written rather than failing the export.
    """
    if isinstance(value, Mapping):
        return {k: _interpolate(v, root, hydra, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, root, hydra, depth) for v in value]
    if not isinstance(value, str) or "${" not in value or depth > 16:
        return value

    def resolve(expr: str) -> Any:
        expr = expr.strip()
        if expr.startswith("hydra:"):
            return _lookup(hydra, expr[len("hydra:") :])
        if expr in LOCATION_RESOLVERS:
            return str(LOCATION_RESOLVERS[expr]())
        if expr.startswith("oc.env:"):
            name, _, default = expr[len("oc.env:") :].partition(",")
            if name.strip() in os.environ:
                return os.environ[name.strip()]
            if default:
                return _interpolate(default.strip(), root, hydra, depth + 1)
            raise KeyError(expr)
        if ":" in expr:
            raise KeyError(expr)  # a resolver this module does not know
        return _interpolate(_lookup(root, expr), root, hydra, depth + 1)

    whole = _INTERPOLATION.fullmatch(value)
    if whole:  # "${a.b}" alone keeps the referenced value's type
        try:
            return resolve(whole.group(1))
        except KeyError:
            return value

    def substitute(match: re.Match) -> str:
        try:
            return str(resolve(match.group(1)))
        except KeyError:
            return match.group(0)

    return _INTERPOLATION.sub(substitute, value)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's config: ``config_resolved.yaml`` (written by training), else Hydra's
    ``.hydra/config.yaml`` with references resolved where possible; None if it has neither."""
    run_dir = Path(run_dir)
    path = run_dir / RESOLVED_CONFIG
    if not path.is_file():
        path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
        hydra_cfg = yaml.safe_load((run_dir / HYDRA_CONFIG).read_text()) if (run_dir / HYDRA_CONFIG).is_file() else {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable run config, the model card omits the training data (%s)", path, e)
        return None
    if not isinstance(cfg, Mapping):
        return None
    hydra = (hydra_cfg or {}).get("hydra", {}) if isinstance(hydra_cfg, Mapping) else {}
    if not (isinstance(hydra, Mapping) and hydra.get("runtime")):
        hydra = {"runtime": {"output_dir": str(run_dir)}}  # the folder *is* the run's output dir
    return _interpolate(cfg, cfg, hydra)


def training_data_card(data: Mapping[str, Any]) -> str:
    """The model card's "Training data" section from a run's ``data`` config."""
    lines = []
    name = data.get("name", "not recorded")
    what = f"`{name}`"
    if data.get("make_toy") or name == "toy":
        what += (
            f" — saferclip's procedurally generated toy world (size `{data.get('toy_size', 'default')}`, "
            f"seed {data.get('toy_seed', 0)}); synthetic, not real images or text"
        )
    lines.append(f"- **Data set:** {what}")
    if data.get("mode"):
        lines.append(f"- **Inputs used:** `{data['mode']}` (text, safe_images, full or auto = all that exist)")
    splits = data.get("splits") or {}
    for split in ("train", "validation"):
        spec = splits.get(split)
        if isinstance(spec, Mapping) and spec.get("path"):
            images = f", images under `{spec['image_root']}`" if spec.get("image_root") else ""
            role = "training" if split == "train" else "model selection"
            lines.append(f"- **{split}** ({role}): `{spec['path']}`{images}")
    config = {k: v for k, v in data.items() if k not in ("zeroshot", "nsfw_caps")}  # those are evaluation data
    lines += ["", "<details><summary>data config of the run</summary>", "", "```yaml", *yaml_lines(config), "```", "", "</details>"]
    return "\n".join(lines)


# ---------------------------------------------------------------- model selection



def exported_epoch_record(run_dir: str | os.PathLike | None, epoch: int | None) -> dict[str, Any] | None:
    """Which epoch is exported and its validation figures, from the run's ``selection.json``:
    ``{"epoch", "global_step", "metrics", "monitor", "score", "selected_epoch"}`` (None when the
    run has no such file or no record of that epoch). ``selected_epoch`` is the epoch the
    run's checkpoint callback chose; it differs from ``epoch`` when another one is exported."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        history = {int(h["epoch"]): h for h in record.get("history", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s: unreadable (%s); the card omits the validation figures", path, e)
        return None
    if epoch is None or int(epoch) not in history:
        return None
    entry = history[int(epoch)]
    monitor = record.get("monitor")
    key = monitor[len("val/") :] if isinstance(monitor, str) and monitor.startswith("val/") else monitor
    selected = record.get("selected") or {}
    return {
        "epoch": int(epoch),
        "global_step": entry.get("global_step"),
        "metrics": entry.get("metrics", {}),
        "monitor": monitor,
        "score": entry.get("metrics", {}).get(key) if key else None,
        "selected_epoch": selected.get("epoch"),
    }


# ---------------------------------------------------------------- the evaluation report


def find_report(run_dir: str | os.PathLike) -> Path | None:
    """The run's evaluation report (``report/results.json``, else ``report/results.md``)."""
    folder = Path(run_dir) / REPORT_DIR
    for name in (REPORT_JSON, REPORT_MARKDOWN):
        if (folder / name).is_file():
            return folder / name
    return None


def _markdown_results(text: str) -> str:
    """The "## Results" section of a results.md (the whole text if it has none)."""
    match = re.search(r"^## Results[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    return (match.group(1) if match else text).strip()


def _report_card(results: Mapping[str, Any], where: str | None, roots: tuple = ()) -> dict[str, Any]:
    """Card fields from the ``results`` dict of :func:`saferclip.evaluation.evaluate_models`;
    paths shown relative to ``roots`` (:func:`saferclip.export.card.public_path`)."""
    from ..evaluation.report import (  # the evaluation package, only when needed
        LEGEND,
        results_table,
    )

    per_model = results.get("results") or {}
    main = {m: {s: r for s, r in suites.items() if s != "cost"} for m, suites in per_model.items()}
    cost = {m: {"cost": suites["cost"]} for m, suites in per_model.items() if "cost" in suites}
    out: dict[str, Any] = {"evaluation": results_table({**results, "results": main}) + "\n\n" + LEGEND}
    if cost:
        out["over_defensiveness"] = results_table({**results, "results": cost})
    meta, data = results.get("meta") or {}, results.get("data") or {}
    parts = []
    for suite, d in data.items():
        if suite == "zeroshot" and isinstance(d, Mapping):
            parts.append(f"zero-shot tasks {', '.join(map(str, d))}")
        elif isinstance(d, Mapping) and d.get("path"):
            parts.append(f"{suite} `{public_path(d['path'], roots)}`")
    described = "; ".join(parts) or "not recorded"
    described += f" (split `{meta.get('split')}`, seed {meta.get('seed')}"
    described += f"; reference model `{public_model_name(meta['reference'])}`)" if meta.get("reference") else ")"
    if where:
        described += f"; full report: `{public_path(where, roots)}`"
    out["evaluation_data"] = described
    return out


def evaluation_card(evaluation: Any, roots: tuple = ()) -> dict[str, Any]:
    """Model-card fields (``evaluation``, ``evaluation_data``, ``over_defensiveness``) from
    an evaluation given as: a report file (``results.json`` / ``results.md``) or a folder
    holding one; the results dict a report is written from; a ``{metric: value}`` or
    ``{model: {metric: value}}`` table; or a Markdown table (a string with ``|``). Local
    paths in the fields are shown relative to ``roots`` (the run folder, the repository)."""
    if evaluation is None:
        return {}
    if isinstance(evaluation, Mapping):
        if isinstance(evaluation.get("results"), Mapping):
            return _report_card(evaluation, None, roots)
        return {"evaluation": dict(evaluation)}
    if isinstance(evaluation, str) and "|" in evaluation and not Path(evaluation).exists():
        return {"evaluation": evaluation}
    if not isinstance(evaluation, (str, os.PathLike)):
        raise TypeError(f"evaluation: expected a report path, a results dict or a table, not {type(evaluation).__name__}")
    path = Path(evaluation).expanduser()
    if path.is_dir():
        found = [path / n for n in (REPORT_JSON, REPORT_MARKDOWN) if (path / n).is_file()] or [
            p for p in (find_report(path),) if p is not None
        ]
        if not found:
            raise FileNotFoundError(f"{path}: no evaluation report ({REPORT_JSON} or {REPORT_MARKDOWN}) in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such evaluation report")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable evaluation report ({e})") from None
    if path.suffix == ".json":
        try:
            results = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a JSON evaluation report ({e})") from None
        if not (isinstance(results, Mapping) and isinstance(results.get("results"), Mapping)):
            raise ConfigError(f"{path}: not a saferclip evaluation report (no 'results' entry)")
        try:
            return _report_card(results, str(path), roots)
        except ImportError:  # saferclip.evaluation missing: the Markdown report beside it will do
            if not (path.parent / REPORT_MARKDOWN).is_file():
                raise ConfigError(f"{path}: cannot format the report without saferclip.evaluation") from None
            path = path.parent / REPORT_MARKDOWN
            text = path.read_text()
    return {"evaluation": _markdown_results(text), "evaluation_data": f"see the full report `{public_path(path, roots)}`"}


# ---------------------------------------------------------------- export


def _check_out_dir(out: Path, trained: TrainedModel) -> None:
    # --force swaps the whole folder out: never when it holds what is being exported
    for kept in (trained.checkpoint, trained.run_dir):
        if kept is not None:
            kept = kept.absolute()
            if out == kept or out in kept.parents:
                raise ConfigError(f"{out}: holds the training run being exported ({kept}); choose another output folder")


def export_checkpoint(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    method: str | Mapping[str, Any] | None = None,
    arch: str | None = None,
    dtype: str = "fp32",
    also_single_file: bool = False,
    evaluation: Any = None,
    run_dir: str | os.PathLike | None = None,
    format: str = "open_clip",
    similarity: LorentzSimilarity | None = None,
) -> Path:
    """Export a trained model as a folder open_clip (or transformers) loads by itself, with a
    model card.

    Args:
        source: a training checkpoint (``.ckpt``), a run folder (its best checkpoint, else
            ``last.ckpt``), or the in-memory training module (``.model`` with its adapters
            unmerged, ``.hparams`` with ``arch`` / ``pretrained`` / ``method``).
        out_dir: the folder to write; an existing non-empty one is replaced only with
            ``force``, and never when it holds the run being exported.
        method: the method (name or config dict) for the card, when the hyper-parameters
            lack it or hold a stale one.
        arch: the architecture expected; an error if the checkpoint holds another.
        dtype / also_single_file: see :func:`saferclip.export.open_clip.export_open_clip`.
        evaluation: the card's evaluation table (see :func:`evaluation_card`); default: the
            run's report, if it has one.
        run_dir: the run folder (for its config and report) when it cannot be inferred.
        format: ``open_clip`` (open_clip's hub layout) or ``hf`` (a transformers CLIP folder,
            :func:`saferclip.export.hf.export_hf`; needs ``transformers``).
        similarity: a HySAC model's geometry with its safe radii (default: the checkpoint's,
            radii from the run folder's ``safe_radii.json``); written as the hyperbolic head
            files beside the towers, in either format.

    The card and the provenance name the base model by its tag / hub id or file name and the
    run by its folder's name; other local paths are shown relative to the run folder or the
    repository (:func:`saferclip.model_card.public_path`), never absolute.

    Returns:
        the export folder.
    """
    out = Path(out_dir).expanduser().absolute()
    if occupied(out) and not force:  # refuse before reading a large checkpoint
        raise FileExistsError(f"{out}: already exists and is not empty; pass force=True (--force) to replace it")
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if also_single_file and format != "open_clip":
        raise ConfigError("also_single_file (--single-file) is an open_clip layout option; not with format 'hf'")
    evaluation_card(evaluation)  # a bad report path fails before the checkpoint loads
    trained = resolve_source(source, run_dir=run_dir)
    _check_out_dir(out, trained)
    # what the card and the provenance show must be fit to publish: no absolute local paths
    roots = (trained.run_dir.absolute() if trained.run_dir else None, locations.home())
    given_eval = evaluation_card(evaluation, roots)
    if arch is not None and arch != trained.arch:
        where = trained.checkpoint or type(source).__name__
        raise CheckpointError(f"{where}: holds a {trained.arch} model, but {arch} was asked for")

    method_cfg = trained.method
    if isinstance(method, Mapping):
        method_cfg = dict(method)
    method_name = method if isinstance(method, str) else method_cfg.get("name")
    hp = trained.hparams
    pretrained = hp.get("pretrained")
    base = "random" if "pretrained" in hp and pretrained is None else (str(pretrained) if pretrained else None)
    base = public_model_name(base)  # a hub tag or id as given, a local file by its name
    method_cfg = public_config(method_cfg, roots)

    card: dict[str, Any] = {"arch": trained.arch, "pretrained": base, "method": method_name}
    if method_cfg:
        card["method_config"] = method_cfg
    run_cfg = read_run_config(trained.run_dir) if trained.run_dir else None
    if run_cfg and isinstance(run_cfg.get("data"), Mapping):
        card["training_data"] = training_data_card(public_config(run_cfg["data"], roots))
    if evaluation is None and trained.run_dir is not None:
        found = find_report(trained.run_dir)
        try:
            given_eval = evaluation_card(found, roots)
        except (ValueError, OSError) as e:
            # a report found by looking, not asked for: a damaged one must not fail the
            # export that ends a long training run
            log.warning("%s; the model card carries no evaluation", e)
    card.update(given_eval)
    card["description"] = _provenance_line(trained)
    selection = exported_epoch_record(trained.run_dir, trained.progress.get("epoch"))
    if selection is not None:
        card["selection"] = selection

    metadata = {
        "method": method_name,
        "pretrained": base,
        "method_config": method_cfg or None,
        "training_checkpoint": public_path(trained.checkpoint.absolute(), roots) if trained.checkpoint else None,
        "run": trained.run_dir.absolute().name if trained.run_dir else None,
        "precision": hp.get("precision"),
        **trained.progress,
    }
    if selection is not None:
        metadata["selection"] = selection
    metadata["source"] = metadata["training_checkpoint"] or f"in-memory {type(source).__name__}"
    extras = _hyperbolic_head_writer(trained, method_cfg, similarity)
    if extras is not None:
        card["hyperbolic"] = True
        metadata["geometry"] = "lorentz"
    if format == "hf":
        from .hf import (
            export_hf,  # needs transformers: only when asked for
        )

        return export_hf(trained.model, trained.arch, out, model_card=card, force=force, metadata=metadata, dtype=dtype, extras=extras)
    return export_open_clip(
        trained.model,
        trained.arch,
        out,
        model_card=card,
        also_single_file=also_single_file,
        force=force,
        metadata=metadata,
        dtype=dtype,
        extras=extras,
    )


def _hyperbolic_head_writer(trained: TrainedModel, method_cfg: Mapping[str, Any], similarity: LorentzSimilarity | None):
    """For a HySAC model: a function writing its hyperbolic head into the export folder."""
    own = getattr(trained.model, "similarity", None)
    if similarity is None and isinstance(own, LorentzSimilarity):
        similarity = own
    if similarity is None and method_cfg.get("name") != "hysac":
        return None
    if similarity is None or similarity.radius_text is None or similarity.radius_image is None:
        where = trained.run_dir or trained.checkpoint or "the source"
        raise ConfigError(
            f"{where}: a HySAC export needs the safe radii (safe_radii.json in the run folder, written when "
            "training ends); rerun the training, or pass similarity= with the radii"
        )
    percentile = (method_cfg.get("hyperbolic") or {}).get("traversal_percentile")
    meta = {"traversal_percentile": percentile}
    return lambda folder: save_head(folder, similarity, meta)


def _provenance_line(trained: TrainedModel) -> str:
    # the run by its folder's name and the checkpoint by its file name: a card is published
    run = trained.run_dir.absolute().name if trained.run_dir else None
    where = f"`{trained.checkpoint.name}` of run `{run}`" if trained.checkpoint and run else (
        f"`{trained.checkpoint.name}`" if trained.checkpoint else "the training module in memory"
    )
    progress = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in trained.progress.items())
    return f"Exported from {where}{f' ({progress})' if progress else ''}; LoRA / adapter weights merged."


__all__ = [
    "TrainedModel",
    "evaluation_card",
    "exported_epoch_record",
    "export_checkpoint",
    "find_report",
    "read_run_config",
    "resolve_source",
    "training_data_card",
]

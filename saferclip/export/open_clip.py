"""Export a fine-tuned CLIP as a folder that open_clip loads by itself, with a model card.

The folder uses open_clip's hub layout (``push_to_hf_hub.save_for_hf``)::

    out_dir/
      open_clip_config.json        {"model_cfg": full architecture config,
                                    "preprocess_cfg": {...}, "saferclip": {provenance}}
      open_clip_model.safetensors  full-size weights with exactly open_clip's keys
      README.md                    model card (Hugging Face front matter)
      <arch>-saferclip.safetensors optional single file (also_single_file=True)
      <arch>.json                  with it, for an arch open_clip does not ship

The config's ``"saferclip"`` section records ``"checksums"`` (xxh3_128, :mod:`saferclip.integrity`)
of the weights and every other JSON / safetensors file but itself, and ``"config_checksum"``
of its own ``model_cfg`` and ``preprocess_cfg``; saferclip verifies them when it loads the
folder and refuses a damaged one in one line.

``open_clip.create_model_and_transforms("local-dir:out_dir")`` and
``open_clip.get_tokenizer("local-dir:out_dir")`` load it without saferclip: the config
carries the whole ``model_cfg``, so saferclip's own tiny architectures need no registration.
Uploading the folder to the Hub makes it loadable as ``hf-hub:user/repo``.

Adapters (saferclip's LoRA, peft, any :class:`~saferclip.model.adapters.MergeableAdapter`)
are merged into a copy first (:func:`saferclip.model.adapters.merge_adapters`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import ConfigError
from ..files import atomic_folder, occupied, write_json_atomic, write_text_atomic
from ..integrity import digest_parts, digests, sha256_file
from ..model._openclip import open_clip
from ..model.adapters import find_adapters, merge_adapters
from ..model.build import ClipBundle, check_arch
from ..model.checkpoints import CheckpointError, save_state_dict
from .card import model_card
from .public_names import public_model_name

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STOCK_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


# ---------------------------------------------------------------- config and weights


def _sync_model_cfg(net: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """The architecture config, corrected to what ``net`` really is.

    open_clip may build a model that differs from the named config (``force_quick_gelu``,
    ``force_image_size``, ``force_context_length``, or QuickGELU weights loaded into a GELU
    model); the exported config must describe the model as it computes.
    """
    cfg = copy.deepcopy(cfg)
    blocks = (open_clip.transformer.ResidualAttentionBlock, open_clip.transformer.CustomResidualAttentionBlock)
    acts = {type(m.mlp.gelu) for m in net.modules() if isinstance(m, blocks) and hasattr(m.mlp, "gelu")}
    quick = cfg.get("quick_gelu", False)
    quick_gelu = open_clip.transformer.QuickGELU
    if (acts == {quick_gelu} and not quick) or (acts and quick_gelu not in acts and quick):
        cfg["quick_gelu"] = not quick
    vision = cfg.get("vision_cfg", {})
    size = getattr(getattr(net, "visual", None), "image_size", None)
    if "timm_model_name" not in vision and isinstance(size, (tuple, list, int)):
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        named = vision.get("image_size", 224)
        if size != (tuple(named) if isinstance(named, (tuple, list)) else (named, named)):
            vision["image_size"] = size[0] if size[0] == size[1] else list(size)
    text = cfg.get("text_cfg", {})
    length = getattr(net, "context_length", None)
    if "hf_model_name" not in text and isinstance(length, int) and length != text.get("context_length", 77):
        text["context_length"] = length
    return cfg


def _preprocess_cfg(net: nn.Module, override: Mapping[str, Any] | None) -> dict[str, Any]:
    """open_clip's preprocessing keys (size, mode, mean, std, interpolation, resize_mode, fill_color)."""
    own = open_clip.model.get_model_preprocess_cfg(net) if hasattr(net, "visual") else {}
    cfg = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), own)
    if override:
        unknown = sorted(set(override) - set(cfg))
        if unknown:
            raise ConfigError(f"preprocess_cfg: unknown keys {unknown}; open_clip knows {sorted(cfg)}")
        cfg.update(override)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _export_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU, contiguous, floating tensors cast to ``dtype``; tensors sharing storage are copied
    (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _check_keys(tensors: Mapping[str, torch.Tensor], folder: Path, arch: str) -> None:
    """The weights must be exactly what open_clip builds from the folder's config."""
    with torch.device("meta"):  # shapes only: no memory, no init cost even for ViT-G
        ref = open_clip.create_model(
            f"local-dir:{folder}", device="meta", load_weights=False, pretrained_text=False, pretrained_image=False
        )
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {expected[k]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return

    def some(items: list[str]) -> str:
        return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")

    parts = []
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected keys ({some(unexpected)}; adapter weights that merge_adapters "
            f"does not know? give the adapter a merged() method, see saferclip.model.adapters.MergeableAdapter)"
        )
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches ({some(wrong)})")
    raise CheckpointError(f"the model's weights do not match open_clip's {arch}: " + "; ".join(parts))


def config_checksum(config: Mapping[str, Any]) -> str:
    """The digest of what the config file tells a loader (``model_cfg``, ``preprocess_cfg``):
    the file cannot hold its own checksum, so it holds this one of its other sections."""
    import json

    return digest_parts([json.dumps(config.get(k), sort_keys=True) for k in ("model_cfg", "preprocess_cfg")])


# ---------------------------------------------------------------- export


def export_open_clip(
    model: nn.Module | ClipBundle,
    arch: str | None,
    out_dir: str | os.PathLike,
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    model_card: Mapping[str, Any] | str | None = None,
    also_single_file: bool = False,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
    dtype: str = "fp32",
    tokenizer: Any = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as a folder open_clip loads with ``local-dir:`` (layout: module doc).

    Args:
        model: an open_clip CLIP (adapters allowed; they are merged into a copy) or a
            ``ClipBundle`` (its arch and source are used when not given).
        arch: open_clip architecture name (``ViT-L-14``, ``saferclip-toy``); may be None for
            a bundle.
        out_dir: the folder to write. If it exists and is not empty, it is replaced only with
            ``force``, and only once the new folder is complete (written beside it, then
            renamed into place); an interrupted export leaves it as it was.
        preprocess_cfg: overrides of the model's image preprocessing (``mean``, ``std``,
            ``size``, ``interpolation``, ``resize_mode``...).
        model_card: the README: a string (used as is), a dict of :func:`model_card` keyword
            arguments, or None for a card built from ``metadata``.
        also_single_file: also write ``<arch>-saferclip.safetensors`` for
            ``open_clip.create_model_and_transforms(arch, pretrained=file)`` (for an arch
            open_clip does not ship, register ``<arch>.json`` first with
            ``open_clip.add_model_config``).
        metadata: provenance stored under ``"saferclip"`` in the config (``method``,
            ``source`` = base weights, run ids, ...).
        dtype: ``fp32`` (default, exact), ``fp16`` or ``bf16`` for the floating tensors.
        tokenizer: only for architectures with a Hugging Face tokenizer (``hf_tokenizer_name``
            in the config: SigLIP, multilingual models): its files are saved into the folder,
            where ``get_tokenizer("local-dir:...")`` looks for them. Defaults to the bundle's,
            else ``open_clip.get_tokenizer(arch)``.
        extras: writes further files into the folder before it is swapped in (a HySAC
            model's hyperbolic head), so they appear together with the weights or not at all.

    Returns:
        the folder's path.
    """
    net, source = (model.model, model.source) if isinstance(model, ClipBundle) else (model, None)
    if isinstance(model, ClipBundle):
        arch = arch or model.arch
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if not arch:
        raise ValueError("export_open_clip needs the architecture name (arch)")
    if ":" in arch or "/" in arch:
        raise ValueError(f"arch must be an open_clip architecture name (e.g. ViT-B-32), not a location: {arch!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).expanduser().absolute()
    if occupied(out) and not force:  # fail before the work, and again at the swap
        raise FileExistsError(f"{out}: already exists; pass force=True to replace it")
    base_cfg = open_clip.get_model_config(arch)
    if base_cfg is None:
        check_arch(arch)  # raises with suggestions
        raise ConfigError(f"open_clip has no config for architecture {arch!r}")

    merged_names = find_adapters(net)
    net = merge_adapters(net)
    model_cfg = _sync_model_cfg(net, base_cfg)
    # the config is published with the weights: a local source by its file name, not its path
    info: dict[str, Any] = {"arch": arch, "method": None, "source": public_model_name(source)}
    info.update(metadata or {})
    info.update(arch=arch, dtype=dtype, saferclip_version=__version__, merged_adapters=len(merged_names))
    config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(net, preprocess_cfg), "saferclip": info}
    tensors = _export_tensors(net.state_dict(), DTYPES[dtype])
    readme = _readme(model_card, arch, info, out.name)

    with atomic_folder(out, replace=force) as tmp:
        write_json_atomic(tmp / CONFIG_NAME, config)
        _check_keys(tensors, tmp, arch)
        st_meta = {"format": "pt", "arch": arch, "dtype": dtype, "method": str(info.get("method"))}
        save_state_dict(tensors, tmp / WEIGHTS_NAME, metadata=st_meta)
        info["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        if also_single_file:
            shutil.copyfile(tmp / WEIGHTS_NAME, tmp / f"{arch}-saferclip.safetensors")
            if not (_STOCK_CONFIGS / f"{arch}.json").is_file():
                write_json_atomic(tmp / f"{arch}.json", model_cfg)
        _save_hf_tokenizer(model_cfg, tokenizer, arch, tmp)
        # what a loader verifies (saferclip.model.build): the weights and configs, not the card
        trusted = [
            WEIGHTS_NAME,
            *sorted(
                p.name
                for p in tmp.iterdir()
                if p.suffix in (".safetensors", ".json") and p.name not in (WEIGHTS_NAME, CONFIG_NAME)
            ),
        ]
        info["checksums"] = digests(tmp, trusted)
        info["config_checksum"] = config_checksum(config)
        write_json_atomic(tmp / CONFIG_NAME, config)
        write_text_atomic(tmp / "README.md", readme)
        if extras is not None:
            extras(tmp)
    log.info("exported %s (%s, %s, %d adapters merged) to %s", arch, info.get("method"), dtype, len(merged_names), out)
    return out


def _save_hf_tokenizer(model_cfg: Mapping[str, Any], tokenizer: Any, arch: str, folder: Path) -> None:
    """open_clip reads a Hugging Face tokenizer of a ``local-dir:`` model from the folder itself."""
    if not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return  # open_clip's built-in CLIP tokenizer: nothing to save
    tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(arch)
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(
            f"{arch} uses a Hugging Face tokenizer, which must be saved into the folder, but the "
            f"tokenizer given ({type(tokenizer).__name__}) has no save_pretrained()"
        )
    tokenizer.save_pretrained(str(folder))


def _readme(card: Mapping[str, Any] | str | None, arch: str, info: Mapping[str, Any], folder: str) -> str:
    if isinstance(card, str):
        return card
    kwargs: dict[str, Any] = {
        "pretrained": info.get("pretrained") or info.get("source"),
        "method": info.get("method"),
        "folder": folder,
    }
    kwargs.update(card or {})
    kwargs.setdefault("arch", arch)
    allowed = set(inspect.signature(model_card).parameters)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"model_card: unknown fields {unknown}; expected some of {sorted(allowed)}")
    return model_card(**kwargs)


__all__ = [
    "export_open_clip",
    "model_card",
]

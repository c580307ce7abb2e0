"""Export an open_clip CLIP as a Hugging Face ``transformers`` folder.

Text-to-image models and multimodal LLMs load CLIP through ``transformers`` (``CLIPModel``,
``CLIPTextModel``, ``CLIPVisionModel``), which is why the published Safe-CLIP models are
distributed in that layout. :func:`export_hf` writes::

    out_dir/
      config.json                 CLIPConfig (text_config, vision_config, projection_dim)
      model.safetensors           CLIPModel weights (text_model.*, vision_model.*, projections)
      preprocessor_config.json    CLIPImageProcessor: open_clip's eval preprocessing
      vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, tokenizer.json
                                  CLIPTokenizer converted from open_clip's BPE (hf_tokenizer)
      saferclip.json              provenance (method, base model, run, epoch, weights hash)
      README.md                   the model card (library_name: transformers)

``CLIPModel.from_pretrained(out_dir)``, ``CLIPTextModel.from_pretrained(out_dir)`` (the text
tower alone, e.g. a Stable Diffusion text encoder), ``CLIPVisionModel``, ``CLIPTokenizer``
and ``CLIPImageProcessor`` load it with transformers alone.

What converts: open_clip's ``CLIP`` class with ViT towers, the OpenAI family (ViT-B/32,
B/16, L/14, L/14@336, their ``-quickgelu`` variants) and anything built the same way
(saferclip's toy architectures included): pre-LN residual blocks with fused-QKV attention,
a learned class token and CLS pooling, causal text with end-of-text pooling, bias-free
projections, GELU / QuickGELU / tanh-GELU. The mapping (open_clip -> transformers)::

    token_embedding / positional_embedding   -> text_model.embeddings.{token,position}_embedding
    [visual.]transformer.resblocks.i.ln_1/2   -> {text,vision}_model.encoder.layers.i.layer_norm1/2
      attn.in_proj_{weight,bias} (q;k;v)      ->   self_attn.{q,k,v}_proj  (split in three)
      attn.out_proj, mlp.c_fc, mlp.c_proj     ->   self_attn.out_proj, mlp.fc1, mlp.fc2
    ln_final                                  -> text_model.final_layer_norm
    text_projection [W, D] (x @ P)            -> text_projection.weight [D, W] (nn.Linear: P^T)
    visual.conv1 / class_embedding / positional_embedding -> vision_model.embeddings.*
    visual.ln_pre / ln_post                   -> vision_model.pre_layrnorm / post_layernorm
    visual.proj [W, D]                        -> visual_projection.weight [D, W]

Anything else (a ResNet or timm image tower, a Hugging Face text tower, layer scale,
attentional pooling, custom attention blocks, a projection bias, SigLIP's logit bias, a
non-CLIP tokenizer, letterbox preprocessing) is refused with one line naming the part.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..files import atomic_folder, occupied, write_json_atomic, write_text_atomic
from ..integrity import digests, sha256_file, verify_all
from ..model._openclip import open_clip
from ..model.adapters import find_adapters, merge_adapters
from ..model.build import ClipBundle
from ..model.checkpoints import save_state_dict
from .hf_tokenizer import UnsupportedArchitecture, check_tokenizer, save_hf_tokenizer
from .open_clip import DTYPES, _export_tensors, _preprocess_cfg, _readme
from .public_names import public_model_name

log = logging.getLogger(__name__)

CustomResidualAttentionBlock = open_clip.transformer.CustomResidualAttentionBlock
QuickGELU = open_clip.transformer.QuickGELU
ResidualAttentionBlock = open_clip.transformer.ResidualAttentionBlock
VisionTransformer = open_clip.transformer.VisionTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
PROVENANCE_NAME = "saferclip.json"
BOS_ID, EOS_ID = 49406, 49407
# PIL resampling codes, which transformers' image processors store as "resample"
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------- what transformers can express


def _activation(tower: str, blocks: list[nn.Module]) -> str:
    acts = {
        type(b.mlp.gelu) if not isinstance(b.mlp.gelu, nn.GELU) else ("gelu", b.mlp.gelu.approximate) for b in blocks
    }
    if len(acts) != 1:
        raise UnsupportedArchitecture(
            f"{tower} tower: blocks with different activations ({acts}); transformers' CLIP has one per tower"
        )
    act = acts.pop()
    if act == QuickGELU:
        return "quick_gelu"
    if act == ("gelu", "none"):
        return "gelu"
    if act == ("gelu", "tanh"):
        return "gelu_pytorch_tanh"
    name = act.__name__ if isinstance(act, type) else f"GELU(approximate={act[1]!r})"
    raise UnsupportedArchitecture(
        f"{tower} tower: activation {name}; transformers' CLIP knows gelu, quick_gelu and tanh-gelu"
    )


def _layer_norm_eps(tower: str, norms: list[nn.Module]) -> float:
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine or n.bias is None:
            raise UnsupportedArchitecture(
                f"{tower} tower: normalisation {type(n).__name__}; transformers' CLIP needs LayerNorm with weight and bias"
            )
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1:
        raise UnsupportedArchitecture(
            f"{tower} tower: LayerNorms with different eps {sorted(eps)}; transformers' CLIP has one per tower"
        )
    return eps.pop()


def _tower_blocks(tower: str, transformer: nn.Module) -> tuple[list[nn.Module], dict[str, Any]]:
    """The residual blocks of a tower, checked, and their shared sizes."""
    blocks = list(getattr(transformer, "resblocks", []))
    if not blocks:
        raise UnsupportedArchitecture(f"{tower} tower: no residual blocks (not open_clip's Transformer)")
    for i, b in enumerate(blocks):
        if isinstance(b, CustomResidualAttentionBlock) or not isinstance(b, ResidualAttentionBlock):
            raise UnsupportedArchitecture(
                f"{tower} tower: block {i} is {type(b).__name__} (qk-norm / scaled cosine / head-scale attention); "
                f"transformers' CLIP has plain pre-LN blocks"
            )
        if not (isinstance(b.ls_1, nn.Identity) and isinstance(b.ls_2, nn.Identity)):
            raise UnsupportedArchitecture(
                f"{tower} tower: layer scale (ls_init_value) in block {i}; transformers' CLIP has none"
            )
        attn = b.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
            raise UnsupportedArchitecture(
                f"{tower} tower: block {i} attention is not fused-QKV MultiheadAttention with bias"
            )
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedArchitecture(f"{tower} tower: block {i} attention has bias_k / zero attention")
        if hasattr(b, "ln_1_kv"):
            raise UnsupportedArchitecture(f"{tower} tower: cross-attention blocks")
    widths = {(b.attn.embed_dim, b.attn.num_heads, b.mlp.c_fc.out_features) for b in blocks}
    if len(widths) != 1:
        raise UnsupportedArchitecture(f"{tower} tower: blocks of different sizes {sorted(widths)}")
    width, heads, mlp = widths.pop()
    sizes = {
        "hidden_size": int(width),
        "num_attention_heads": int(heads),
        "intermediate_size": int(mlp),
        "num_hidden_layers": len(blocks),
        "hidden_act": _activation(tower, blocks),
    }
    return blocks, sizes


def _square(value: Any, what: str) -> int:
    a, b = (tuple(value) + tuple(value))[:2] if isinstance(value, (tuple, list)) else (value, value)
    if a != b:
        raise UnsupportedArchitecture(
            f"image tower: {what} {a}x{b} is not square; transformers' CLIPVisionModel needs a square {what}"
        )
    return int(a)


def hf_clip_config(model: nn.Module) -> dict[str, Any]:
    """``CLIPConfig`` keyword arguments for ``model`` (an open_clip ``CLIP``, adapters merged).

    Raises :class:`UnsupportedArchitecture`, naming the part, for what transformers' CLIP
    cannot express (module doc). Works on a model on the meta device (shapes only).
    """
    if not isinstance(model, open_clip.CLIP):
        kind = type(model).__name__
        part = "text tower" if isinstance(model, open_clip.CustomTextCLIP) else "model"
        raise UnsupportedArchitecture(
            f"{part}: {kind} (a separate text module, e.g. a Hugging Face text tower); transformers' CLIPModel "
            f"holds open_clip's built-in CLIP text transformer"
        )
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedArchitecture(
            f"image tower: {type(visual).__name__} (ResNet / timm); transformers' CLIPVisionModel is a ViT"
        )
    if getattr(model, "logit_bias", None) is not None:
        raise UnsupportedArchitecture(
            "model: a logit bias (SigLIP-style); transformers' CLIPModel has only a logit scale"
        )
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
        raise UnsupportedArchitecture(
            f"image tower: pooling {'attentional' if getattr(visual, 'attn_pool', None) is not None else repr(visual.pool_type)}; "
            f"transformers' CLIPVisionModel pools the class token"
        )
    if isinstance(visual.ln_pre, nn.Identity):
        raise UnsupportedArchitecture(
            "image tower: no LayerNorm before the transformer (no_ln_pre); transformers' CLIPVisionModel always has one"
        )
    if visual.proj is None or not isinstance(visual.proj, torch.Tensor):
        raise UnsupportedArchitecture(
            "image tower: no linear projection (visual.proj); transformers' CLIPModel needs one"
        )
    if visual.conv1.bias is not None:
        raise UnsupportedArchitecture(
            "image tower: a patch embedding with bias; transformers' CLIPVisionModel has none"
        )
    image_size = _square(visual.image_size, "image size")
    patch_size = _square(visual.patch_size, "patch size")
    _, vision = _tower_blocks("image", visual.transformer)
    vision_eps = _layer_norm_eps(
        "image", [visual.ln_pre, visual.ln_post, *[m for b in visual.transformer.resblocks for m in (b.ln_1, b.ln_2)]]
    )

    if model.attn_mask is None:
        raise UnsupportedArchitecture(
            "text tower: not causal (no_causal_mask); transformers' CLIPTextModel is always causal"
        )
    pool = model.text_pool_type
    if not (pool == "argmax" or (pool == "eos" and model.text_eos_id == EOS_ID)):
        raise UnsupportedArchitecture(
            f"text tower: pooling {pool!r}; transformers' CLIPTextModel pools at the end-of-text token (open_clip 'argmax')"
        )
    proj = model.text_projection
    if isinstance(proj, nn.Linear):
        if proj.bias is not None:
            raise UnsupportedArchitecture(
                "text tower: a text projection with bias (proj_bias); transformers' CLIPModel's has none"
            )
        text_dim = proj.out_features
    elif isinstance(proj, torch.Tensor):
        text_dim = proj.shape[1]
    else:
        raise UnsupportedArchitecture(
            "text tower: no text projection (proj_type 'none'); transformers' CLIPModel needs one"
        )
    embed_dim = int(visual.proj.shape[1])
    if text_dim != embed_dim:
        raise UnsupportedArchitecture(f"model: text ({text_dim}) and image ({embed_dim}) embeddings differ in width")
    _, text = _tower_blocks("text", model.transformer)
    text_eps = _layer_norm_eps(
        "text", [model.ln_final, *[m for b in model.transformer.resblocks for m in (b.ln_1, b.ln_2)]]
    )
    vocab = int(model.token_embedding.num_embeddings)
    if vocab != 49408:
        raise UnsupportedArchitecture(
            f"text tower: a vocabulary of {vocab} tokens; the export covers open_clip's 49,408-token CLIP BPE"
        )

    logit_scale = (
        float(model.logit_scale.detach().float().reshape(-1)[0])
        if not model.logit_scale.is_meta
        else math.log(1 / 0.07)
    )
    return {
        "text_config": {
            **text,
            "vocab_size": vocab,
            "max_position_embeddings": int(model.positional_embedding.shape[0]),
            "layer_norm_eps": text_eps,
            "bos_token_id": BOS_ID,
            # first end-of-text position = open_clip's argmax pooling (49407 is the largest id)
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,  # the converted tokenizer pads with <|endoftext|>
            "projection_dim": embed_dim,
            "attention_dropout": 0.0,
        },
        "vision_config": {
            **vision,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": int(visual.conv1.in_channels),
            "layer_norm_eps": vision_eps,
            "projection_dim": embed_dim,
            "attention_dropout": 0.0,
        },
        "projection_dim": embed_dim,
        "logit_scale_init_value": logit_scale,
    }


# ---------------------------------------------------------------- weights


def _blocks(sd: Mapping[str, torch.Tensor], src: str, dst: str, n: int, out: dict[str, torch.Tensor]) -> None:
    for i in range(n):
        p, q = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
        # nn.MultiheadAttention stacks the query, key and value projections in that order
        for name, w, b in zip("qkv", sd[p + "attn.in_proj_weight"].chunk(3), sd[p + "attn.in_proj_bias"].chunk(3)):
            out[q + f"self_attn.{name}_proj.weight"] = w
            out[q + f"self_attn.{name}_proj.bias"] = b
        for a, c in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[q + c + ".weight"] = sd[p + a + ".weight"]
            out[q + c + ".bias"] = sd[p + a + ".bias"]


def hf_state_dict(model: nn.Module, config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``model``'s weights under transformers' ``CLIPModel`` names (module doc), unconverted dtype.

    ``config``: :func:`hf_clip_config` of the model (computed when not given)."""
    config = config or hf_clip_config(model)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    _blocks(sd, "transformer", "text_model.encoder", config["text_config"]["num_hidden_layers"], out)
    _blocks(sd, "visual.transformer", "vision_model.encoder", config["vision_config"]["num_hidden_layers"], out)
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for src, dst in (
        ("ln_final", "text_model.final_layer_norm"),
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ):
        out[dst + ".weight"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]
    # open_clip multiplies x @ P ([W, D]); transformers' nn.Linear computes x @ weight.T
    out["text_projection.weight"] = (
        sd["text_projection.weight"] if "text_projection.weight" in sd else sd["text_projection"].T
    )
    out["visual_projection.weight"] = sd["visual.proj"].T
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return out


def check_hf_keys(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """The tensors must be exactly what ``CLIPModel(config)`` holds (built on the meta device)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        ref = CLIPModel(CLIPConfig(**config))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {expected[k]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise UnsupportedArchitecture(
            f"model: the converted weights do not fit transformers' CLIPModel "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {wrong[:3]})"
        )


# ---------------------------------------------------------------- preprocessing


def hf_preprocessor_config(preprocess_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` (CLIPImageProcessor) from open_clip's preprocessing keys.

    open_clip's eval transform: resize (shortest side, or squash) -> centre crop -> RGB ->
    [0, 1] -> normalise. Two behaviours of transformers' CLIPImageProcessor differ and are
    documented in the README, not fixable from a config: its centre crop rounds the offset down
    where torchvision rounds half to even (a one-pixel shift when the resized long side exceeds
    the crop by 3 mod 4 pixels), and it composites RGBA images on white where open_clip drops
    the alpha channel. Its default torchvision backend also resizes tensors rather than PIL
    images (within one 8-bit level); ``backend="pil"`` resizes exactly as open_clip does.
    """
    mode = preprocess_cfg.get("mode", "RGB")
    if mode != "RGB":
        raise UnsupportedArchitecture(f"image preprocessing: colour mode {mode!r}; CLIPImageProcessor converts to RGB")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in RESAMPLE:
        raise UnsupportedArchitecture(
            f"image preprocessing: interpolation {interpolation!r}; expected one of {sorted(RESAMPLE)}"
        )
    size = preprocess_cfg.get("size", 224)
    h, w = (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    config: dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": RESAMPLE[interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "image_std": [float(x) for x in preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)],
    }
    if resize_mode == "shortest":
        if h != w:
            raise UnsupportedArchitecture(
                f"image preprocessing: a {h}x{w} crop after a shortest-side resize; CLIPImageProcessor's is square"
            )
        config.update(
            size={"shortest_edge": int(h)}, do_center_crop=True, crop_size={"height": int(h), "width": int(w)}
        )
    elif resize_mode == "squash":
        config.update(
            size={"height": int(h), "width": int(w)},
            do_center_crop=False,
            crop_size={"height": int(h), "width": int(w)},
        )
    else:
        raise UnsupportedArchitecture(
            f"image preprocessing: resize_mode {resize_mode!r} (letterbox padding); CLIPImageProcessor only resizes and crops"
        )
    return config


# ---------------------------------------------------------------- export


def export_hf(
    model: nn.Module | ClipBundle,
    arch: str | None,
    out_dir: str | os.PathLike,
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    model_card: Mapping[str, Any] | str | None = None,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
    dtype: str = "fp32",
    tokenizer: Any = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as a transformers CLIP folder (layout and mapping: module doc).
    ``extras`` writes further files into it before the swap (a HySAC model's hyperbolic head).

    Args:
        model: an open_clip ``CLIP`` (adapters allowed; merged into a copy) or a
            ``ClipBundle`` (its arch, source and tokenizer are used when not given).
        arch: open_clip architecture name, for the card and provenance.
        out_dir: the folder to write; an existing non-empty one is replaced only with
            ``force``, once the new one is complete.
        preprocess_cfg: overrides of open_clip's preprocessing keys (as in
            :func:`saferclip.export.export_open_clip`).
        model_card: the README: a string, a dict of :func:`saferclip.export.card.model_card`
            arguments, or None for one from ``metadata``.
        metadata: provenance written to ``saferclip.json``.
        dtype: ``fp32`` (default, exact), ``fp16`` or ``bf16``.
        tokenizer: open_clip's tokenizer of the model (default: the bundle's, else the arch's).
            The converted one pads with ``<|endoftext|>`` (see :mod:`.hf_tokenizer`).

    Raises:
        UnsupportedArchitecture: one line naming the part transformers cannot express.
        FileExistsError: ``out_dir`` is occupied and ``force`` is not set.
    """
    net, source = (model.model, model.source) if isinstance(model, ClipBundle) else (model, None)
    if isinstance(model, ClipBundle):
        arch = arch or model.arch
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:
        if not arch:
            raise ValueError("export_hf needs the architecture name (arch) or the model's tokenizer")
        tokenizer = open_clip.get_tokenizer(arch)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).expanduser().absolute()
    if occupied(out) and not force:
        raise FileExistsError(f"{out}: already exists; pass force=True to replace it")

    merged_names = find_adapters(net)
    net = merge_adapters(net)
    check_tokenizer(tokenizer)
    config = hf_clip_config(net)
    preprocessor = hf_preprocessor_config(_preprocess_cfg(net, preprocess_cfg))
    tensors = _export_tensors(hf_state_dict(net, config), DTYPES[dtype])
    check_hf_keys(tensors, config)

    info: dict[str, Any] = {"arch": arch, "method": None, "source": public_model_name(source)}
    info.update(metadata or {})
    info.update(
        arch=arch, format="transformers", dtype=dtype, saferclip_version=__version__, merged_adapters=len(merged_names)
    )
    card = model_card
    if card is None or isinstance(card, Mapping):
        card = {"library": "transformers", **(card or {})}
    readme = _readme(card, arch or "CLIP", info, out.name)

    with atomic_folder(out, replace=force) as tmp:
        _save_config(config, dtype, tmp)
        save_state_dict(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})  # "pt": transformers checks it
        info["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        write_json_atomic(tmp / PREPROCESSOR_NAME, preprocessor)
        save_hf_tokenizer(tokenizer, tmp, config["text_config"]["max_position_embeddings"])
        # verified by saferclip's loaders (saferclip.downstream.diffusion); the card is not
        trusted = sorted(p.name for p in tmp.iterdir() if p.suffix in (".safetensors", ".json"))
        info["checksums"] = digests(tmp, trusted)
        write_json_atomic(tmp / PROVENANCE_NAME, info)
        write_text_atomic(tmp / "README.md", readme)
        if extras is not None:
            extras(tmp)
    log.info(
        "exported %s (%s, %s, %d adapters merged) to %s as transformers CLIP",
        arch,
        info.get("method"),
        dtype,
        len(merged_names),
        out,
    )
    return out


def _save_config(config: Mapping[str, Any], dtype: str, folder: Path) -> None:
    """config.json as transformers writes it (model_type, architectures, version, dtype)."""
    from transformers import CLIPConfig

    cfg = CLIPConfig(**config)
    cfg.architectures = ["CLIPModel"]
    payload = cfg.to_dict()
    payload["dtype"] = _TORCH_DTYPE_NAMES[dtype]
    write_text_atomic(folder / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def verify_export(folder: str | os.PathLike) -> None:
    """Check the files of a ``--format hf`` export against the checksums in its ``saferclip.json``
    (DamagedArtefact naming the file); a folder without them (not saferclip's, or older) passes."""
    from ..integrity import DamagedArtefact

    try:
        info = read_provenance(folder)
    except (OSError, ValueError) as e:
        raise DamagedArtefact(Path(folder) / PROVENANCE_NAME, f"unreadable ({e})") from None
    if isinstance(info, dict) and "checksums" in info:
        verify_all(folder, info["checksums"], "exported model")


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """``saferclip.json`` of an export folder ({} when absent)."""
    path = Path(folder) / PROVENANCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = [
    "UnsupportedArchitecture",
    "check_hf_keys",
    "export_hf",
    "hf_clip_config",
    "hf_preprocessor_config",
    "hf_state_dict",
    "read_provenance",
    "verify_export",
]

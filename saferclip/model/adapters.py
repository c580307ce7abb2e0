"""Choosing what trains: LoRA adapters, the last N blocks, or everything, per encoder; and
merging adapters back into plain weights.

LoRA is a weight *parametrization* (``torch.nn.utils.parametrize``): ``W -> W + s * B @ A``.
That works on any weight tensor, including the packed ``in_proj_weight`` of open_clip's
``nn.MultiheadAttention`` (where the reference adapts k and v only: a row mask keeps q
frozen), survives DDP and ``state_dict`` round trips, and merges exactly with
``remove_parametrizations(..., leave_parametrized=True)`` into open_clip's own keys.

:func:`merge_adapters` merges every kind of adapter a model may carry. A submodule takes
part when it is
  * a peft model (``merge_and_unload()``), or a peft tuner layer (``merge()`` in place,
    then ``get_base_layer()``);
  * a :class:`MergeableAdapter`: ``merged()`` returns the plain module that replaces it
    (``merge()`` / ``merged_linear()`` returning a module are accepted under that name);
  * parametrized with ``torch.nn.utils.parametrize`` (saferclip's LoRA): every
    parametrization is folded into its weight.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

TOWERS = ("text", "image")
LORA_TARGETS = ("attn.kv", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class LoRADelta(nn.Module):
    """Parametrization adding a low-rank update ``scale * B @ A`` to a ``[out, in]`` weight.

    ``row_mask`` ([out] bool) restricts the update to some output rows (k and v of a packed
    q/k/v projection). B starts at zero, so an adapted model equals the original at step 0.
    """

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float, row_mask: torch.Tensor | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.register_buffer("row_mask", None if row_mask is None else row_mask.float().unsqueeze(1), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scale
        if self.row_mask is not None:
            delta = delta * self.row_mask
        return weight + delta.to(weight.dtype)


@dataclass
class TrainableConfig:
    mode: str = "lora"  # lora | full | last_n
    towers: tuple[str, ...] = TOWERS  # which encoders train: text, image
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    last_n_blocks: int = 2
    extra: dict = field(default_factory=dict)


def tower_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The text and image towers of an open_clip CLIP (``CLIP`` or ``CustomTextCLIP``)."""
    text = model.text if hasattr(model, "text") else model.transformer
    return {"text": text, "image": model.visual}


def tower_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter of one encoder (``text`` or ``image``), adapters included; for the
    plain ``CLIP`` class also the text parts that sit on the CLIP object itself."""
    if name not in TOWERS:
        raise ConfigError(f"unknown tower {name!r}; expected one of {TOWERS}")
    params = list(tower_modules(model)[name].parameters())
    return params + (_text_extras(model) if name == "text" else [])


def _text_extras(model: nn.Module) -> list[nn.Parameter]:
    """Text-tower parameters that live on the CLIP object itself (the plain ``CLIP`` class)."""
    if hasattr(model, "text"):
        return []
    names = ("token_embedding", "positional_embedding", "ln_final", "text_projection")
    out = []
    for name in names:
        obj = getattr(model, name, None)
        if isinstance(obj, nn.Parameter):
            out.append(obj)
        elif isinstance(obj, nn.Module):
            out.extend(obj.parameters())
    return out


def _resblocks(tower: nn.Module) -> nn.ModuleList:
    transformer = (
        tower.transformer if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks") else tower
    )
    if not hasattr(transformer, "resblocks"):
        raise ValueError(f"{type(tower).__name__} has no transformer resblocks; LoRA / last_n need a ViT-style tower")
    return transformer.resblocks


def configure_trainable(model: nn.Module, cfg: TrainableConfig) -> dict[str, int]:
    """Freeze everything, then make the configured part trainable. Returns parameter counts."""
    unknown = set(cfg.towers) - set(TOWERS)
    if unknown or not cfg.towers:
        raise ConfigError(f"trainable towers must be a non-empty subset of {TOWERS}, got {list(cfg.towers)}")
    model.requires_grad_(False)
    towers = tower_modules(model)
    if cfg.mode == "lora":
        for name in cfg.towers:
            add_lora(_resblocks(towers[name]), cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    elif cfg.mode == "full":
        for name in cfg.towers:
            towers[name].requires_grad_(True)
            if name == "text":
                for p in _text_extras(model):
                    p.requires_grad_(True)
    elif cfg.mode == "last_n":
        if cfg.last_n_blocks < 1:
            raise ConfigError(f"last_n_blocks must be >= 1, got {cfg.last_n_blocks}")
        for name in cfg.towers:
            blocks = _resblocks(towers[name])
            for block in list(blocks)[-cfg.last_n_blocks :]:
                block.requires_grad_(True)
            _unfreeze_heads(model, towers[name], name)
    else:
        raise ConfigError(f"unknown trainable mode {cfg.mode!r}; expected lora, full or last_n")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def _unfreeze_heads(model: nn.Module, tower: nn.Module, name: str) -> None:
    """Final norm and projection of a tower: what sits after the last block."""
    if name == "image":
        for attr in ("ln_post", "proj"):
            obj = getattr(tower, attr, None)
            if isinstance(obj, nn.Parameter):
                obj.requires_grad_(True)
            elif isinstance(obj, nn.Module):
                obj.requires_grad_(True)
    else:
        holder = model.text if hasattr(model, "text") else model
        for attr in ("ln_final", "text_projection"):
            obj = getattr(holder, attr, None)
            if isinstance(obj, nn.Parameter):
                obj.requires_grad_(True)
            elif isinstance(obj, nn.Module):
                obj.requires_grad_(True)


def add_lora(blocks: nn.ModuleList, r: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Register LoRA parametrizations on each block's targets; returns how many were added."""
    bad = set(targets) - set(LORA_TARGETS)
    if bad:
        raise ConfigError(f"unknown LoRA targets {sorted(bad)}; expected some of {LORA_TARGETS}")
    added = 0
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        for target in targets:
            if target == "attn.kv":
                weight = attn.in_proj_weight
                d = weight.shape[1]
                mask = torch.zeros(weight.shape[0], dtype=torch.bool)
                mask[d:] = True  # rows d:3d are k and v
                module, pname = attn, "in_proj_weight"
            elif target == "attn.out_proj":
                module, pname, mask = attn.out_proj, "weight", None
            else:
                module, pname, mask = getattr(mlp, target.split(".")[1]), "weight", None
            out_f, in_f = getattr(module, pname).shape
            parametrize.register_parametrization(module, pname, LoRADelta(out_f, in_f, r, alpha, mask))
            added += 1
    return added


# ---------------------------------------------------------------- merging adapters


@runtime_checkable
class MergeableAdapter(Protocol):
    """An adapter module that can hand back the plain module it stands for.

    ``merged()`` returns a module with the adapted weights folded in and the parameter names
    of the module it wraps (for a LoRA on an ``nn.Linear``: an ``nn.Linear`` whose weight is
    ``W + scale * B @ A``), without changing what the model computes. It should not modify
    ``self``. :func:`merge_adapters` puts the result where the adapter was.
    """

    def merged(self) -> nn.Module: ...


# ---------------------------------------------------------------- merging adapters


def _adapter_kind(module: nn.Module) -> str | None:
    def has(name: str) -> bool:
        return callable(getattr(module, name, None))

    if has("merge_and_unload"):
        return "peft-model"
    if has("merged"):  # MergeableAdapter (peft layers have a *bool* property of that name)
        return "mergeable"
    if has("get_base_layer") and has("merge"):
        return "peft-layer"
    if has("merged_linear") or has("merge"):
        return "merge-alias"
    if parametrize.is_parametrized(module):
        return "parametrized"
    return None


def find_adapters(model: nn.Module) -> list[str]:
    """Names of the submodules :func:`merge_adapters` would merge (``""`` is the model itself)."""
    found: list[str] = []

    def walk(module: nn.Module, name: str) -> None:
        kind = _adapter_kind(module)
        if kind is not None:
            found.append(name)
            if kind != "parametrized":
                return  # the adapter's insides go away with it
        for child_name, child in module.named_children():
            if child_name != "parametrizations":
                walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return found


def _merge_one(module: nn.Module, kind: str, name: str) -> nn.Module:
    where = f"{name or '<model>'} ({type(module).__name__})"
    if kind == "peft-model":
        out = module.merge_and_unload()
    elif kind == "mergeable":
        out = module.merged()
    elif kind == "peft-layer":
        module.merge()
        out = module.get_base_layer()
    elif kind == "merge-alias":
        out = module.merged_linear() if callable(getattr(module, "merged_linear", None)) else module.merge()
    else:  # parametrized: fold every parametrization into the tensor it produces
        # torch gives a parametrized module a generated class whose properties serve the
        # tensors, and a deepcopy shares that class with the original: removing a
        # parametrization deletes the property from the class, breaking the original too.
        # Fold on a private copy of the class instead.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for pname in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        return module
    if not isinstance(out, nn.Module):
        raise TypeError(
            f"merging {where} returned {type(out).__name__}, not a module; implement "
            f"saferclip.model.adapters.MergeableAdapter.merged() returning the plain module"
        )
    if out is module:
        raise TypeError(f"merging {where} returned the adapter itself; merged() must return the plain module")
    return out


def merge_adapters(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every adapter in ``model`` into plain weights (see the module doc for the kinds).

    Returns the merged model; ``model`` itself is left as it was unless ``inplace`` (a model
    without adapters is returned as is, uncopied). What the model computes does not change.
    """
    if not find_adapters(model):
        return model
    if not inplace:
        model = copy.deepcopy(model)

    def walk(module: nn.Module, name: str) -> nn.Module:
        kind = _adapter_kind(module)
        if kind is not None:
            module = _merge_one(module, kind, name)
        for child_name, child in list(module.named_children()):
            new = walk(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    with torch.no_grad():
        return walk(model, "")

"""Choosing what trains: LoRA adapters, the last N blocks, or everything, per encoder.

LoRA is a weight *parametrization* (``torch.nn.utils.parametrize``): ``W -> W + s * B @ A``.
That works on any weight tensor, including the packed ``in_proj_weight`` of open_clip's
``nn.MultiheadAttention`` (where the reference adapts k and v only: a row mask keeps q
frozen), survives DDP and ``state_dict`` round trips, and merges exactly with
``remove_parametrizations(..., leave_parametrized=True)`` into open_clip's own keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

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
        raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
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
    transformer = tower.transformer if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks") else tower
    if not hasattr(transformer, "resblocks"):
        raise ValueError(f"{type(tower).__name__} has no transformer resblocks; LoRA / last_n need a ViT-style tower")
    return transformer.resblocks


def configure_trainable(model: nn.Module, cfg: TrainableConfig) -> dict[str, int]:
    """Freeze everything, then make the configured part trainable. Returns parameter counts."""
    unknown = set(cfg.towers) - set(TOWERS)
    if unknown or not cfg.towers:
        raise ValueError(f"trainable towers must be a non-empty subset of {TOWERS}, got {list(cfg.towers)}")
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
            raise ValueError(f"last_n_blocks must be >= 1, got {cfg.last_n_blocks}")
        for name in cfg.towers:
            blocks = _resblocks(towers[name])
            for block in list(blocks)[-cfg.last_n_blocks :]:
                block.requires_grad_(True)
            _unfreeze_heads(model, towers[name], name)
    else:
        raise ValueError(f"unknown trainable mode {cfg.mode!r}; expected lora, full or last_n")
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
        raise ValueError(f"unknown LoRA targets {sorted(bad)}; expected some of {LORA_TARGETS}")
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


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place: the model has open_clip's keys again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    return model

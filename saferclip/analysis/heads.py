"""What a CLIP encoder computes inside, at the token it pools: per-head attention outputs,
the residual stream after each block, and the inputs of each MLP, read with hooks.

open_clip's text and vision towers are stacks of ``ResidualAttentionBlock`` (``block.attn`` an
``nn.MultiheadAttention`` with a packed ``in_proj_weight`` and an ``out_proj``; ``block.mlp``
``c_fc -> gelu -> c_proj``). The text tower pools at the end-of-text token (position
``tokens.argmax(-1)`` for CLIP's tokenizer), the vision tower at the class token (position 0).

Per-head outputs are not materialised by PyTorch's fused attention, so a forward pre-hook on
each ``block.attn`` takes its input (the ``ln_1`` output, all positions) and its mask, and
recomputes, for the pooled query position only, each head's attention-weighted value
``z_h [d_head]`` (:func:`head_values`). Head ``h`` adds ``W_o[:, h] z_h`` to the residual
stream; the sum over heads plus the ``out_proj`` bias is the module's own output at that
position (checked in the tests). The text tower runs through
:func:`saferclip.model.build.encode_tokens` (batch padding trimmed): the tower is causal, so the
end-of-text position sees the same keys either way.

Library code: no Lightning, no Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.encode import encode_image_files, encode_texts
from ..model.build import ClipBundle, eval_mode

TOWERS = ("text", "image")
KINDS = ("heads", "resid", "mlp_in", "mlp_hidden")


def _check_tower(tower: str) -> None:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")


def tower_transformer(model: nn.Module, tower: str) -> nn.Module:
    """The ``open_clip.transformer.Transformer`` of a tower (``text`` or ``image``)."""
    _check_tower(tower)
    if not isinstance(model, open_clip.CLIP):
        raise TypeError(
            f"per-head analysis supports open_clip.CLIP models (separate text and vision towers), got {type(model).__name__}"
        )
    transformer = model.transformer if tower == "text" else getattr(model.visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise TypeError(
            f"the {tower} tower of this model is not a transformer with resblocks (e.g. a ResNet image tower)"
        )
    return transformer


def tower_blocks(model: nn.Module, tower: str) -> list[nn.Module]:
    return list(tower_transformer(model, tower).resblocks)


@dataclass(frozen=True)
class TowerShape:
    """Layers, heads per layer, head width and residual width of a tower."""

    layers: int
    heads: int
    head_dim: int
    width: int


def tower_shape(model: nn.Module, tower: str) -> TowerShape:
    blocks = tower_blocks(model, tower)
    attn = _attention(blocks[0])
    return TowerShape(len(blocks), attn.num_heads, attn.head_dim, attn.embed_dim)


def _attention(block: nn.Module) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"expected block.attn to be nn.MultiheadAttention, got {type(attn).__name__}")
    if attn.bias_k is not None or attn.add_zero_attn:
        raise TypeError("attention with bias_k / add_zero_attn is not supported")
    return attn


def _qkv_weights(
    attn: nn.MultiheadAttention,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    d = attn.embed_dim
    if attn.in_proj_weight is not None:
        wq, wk, wv = attn.in_proj_weight[:d], attn.in_proj_weight[d : 2 * d], attn.in_proj_weight[2 * d :]
    else:
        wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    b = attn.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:d], b[d : 2 * d], b[2 * d :])
    return wq, wk, wv, bq, bk, bv


def head_values(attn: nn.MultiheadAttention, x: Tensor, positions: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Each head's attention output at one query position per item, before ``out_proj``.

    Args:
        x: the attention input (``ln_1`` output), batch-first ``[B, L, D]``.
        positions: ``[B]`` the query position of each item.
        attn_mask: ``[L, L]`` additive float mask or boolean (True = not allowed), as
            ``nn.MultiheadAttention`` takes it; None for none.

    Returns:
        ``[B, H, d_head]``.
    """
    b, length, _ = x.shape
    h, dh = attn.num_heads, attn.head_dim
    wq, wk, wv, bq, bk, bv = _qkv_weights(attn)
    rows = torch.arange(b, device=x.device)
    xq = x[rows, positions]  # [B, D]
    q = F.linear(xq, wq, bq).view(b, h, dh)
    k = F.linear(x, wk, bk).view(b, length, h, dh)
    v = F.linear(x, wv, bv).view(b, length, h, dh)
    scores = torch.einsum("bhd,blhd->bhl", q, k) / math.sqrt(dh)
    if attn_mask is not None:
        mask = attn_mask[positions] if attn_mask.dim() == 2 else attn_mask  # [B, L]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask[:, None, :], float("-inf"))
        else:
            scores = scores + mask[:, None, :].to(scores.dtype)
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhl,blhd->bhd", weights, v)


def head_contributions(attn: nn.MultiheadAttention, z: Tensor) -> Tensor:
    """``[B, H, d_head]`` head values -> ``[B, H, D]``: what each head adds through ``out_proj``
    (bias left out; the sum over heads plus ``out_proj.bias`` is the attention output)."""
    h, dh = attn.num_heads, attn.head_dim
    w = attn.out_proj.weight.view(attn.embed_dim, h, dh)  # [D, H, dh]
    return torch.einsum("bhd,ehd->bhe", z, w)


# ----------------------------------------------------------------------------- recording
@dataclass
class Activations:
    """What one tower computed at its pooled token for N inputs (float32, CPU).

    ``final``: ``[N, E]`` L2-normalised embeddings; ``heads``: ``[N, layers, H, d_head]``;
    ``resid``: ``[N, layers, D]`` residual stream after each block; ``mlp_in``: ``[N, layers, D]``
    input of each ``mlp.c_fc``; ``mlp_hidden``: ``[N, layers, 4D]`` input of each ``mlp.c_proj``.
    Kinds not asked for are None.
    """

    final: Tensor
    heads: Tensor | None = None
    resid: Tensor | None = None
    mlp_in: Tensor | None = None
    mlp_hidden: Tensor | None = None

    def __len__(self) -> int:
        return len(self.final)

    @staticmethod
    def cat(parts: Sequence[Activations]) -> Activations:
        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Activations(*(join(n) for n in ("final", "heads", "resid", "mlp_in", "mlp_hidden")))


class _Recorder:
    """Hooks that keep, per forward pass, the pooled-token activations of a tower's blocks.

    The pooled position is found without the caller's help: for the text tower a pre-hook on
    ``token_embedding`` reads it from the tokens of each forward; the vision tower pools at
    position 0. Every forward appends one batch; :meth:`take` joins them."""

    def __init__(self, model: nn.Module, tower: str, kinds: tuple[str, ...], layers: tuple[int, ...] | None = None):
        transformer = tower_transformer(model, tower)
        self.model, self.tower, self.kinds = model, tower, kinds
        self.blocks = list(transformer.resblocks)
        self.batch_first = getattr(transformer, "batch_first", True)
        self.layers = tuple(range(len(self.blocks))) if layers is None else tuple(layers)
        self.positions: Tensor | None = None
        self.store: dict[str, dict[int, list[Tensor]]] = {}

    def _bf(self, t: Tensor) -> Tensor:
        return t if self.batch_first else t.transpose(0, 1)

    def _positions(self, batch: int, device: torch.device) -> Tensor:
        if self.tower == "image":
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self.positions is None or len(self.positions) != batch:
            raise RuntimeError(
                "no end-of-text positions recorded for this text batch (was the token embedding bypassed?)"
            )
        return self.positions.to(device)

    def _put(self, kind: str, layer: int, value: Tensor) -> None:
        self.store.setdefault(kind, {}).setdefault(layer, []).append(value.detach().float().cpu())

    def _pooled(self, t: Tensor) -> Tensor:
        t = self._bf(t)
        return t[torch.arange(t.shape[0], device=t.device), self._positions(t.shape[0], t.device)]

    @contextmanager
    def hooks(self) -> Iterator[_Recorder]:
        handles = []
        if self.tower == "text":

            def on_tokens(module, args):
                self.positions = pooled_text_positions(self.model, args[0])

            handles.append(self.model.token_embedding.register_forward_pre_hook(on_tokens))
        for i in self.layers:
            block = self.blocks[i]
            if "heads" in self.kinds:
                attn = _attention(block)

                def on_attn(module, args, kwargs, i=i, attn=attn):
                    x = self._bf(args[0]).float()
                    z = head_values(
                        attn, x, self._positions(x.shape[0], x.device), _float_mask(kwargs.get("attn_mask"))
                    )
                    self._put("heads", i, z)

                handles.append(attn.register_forward_pre_hook(on_attn, with_kwargs=True))
            if "resid" in self.kinds:
                handles.append(
                    block.register_forward_hook(lambda m, a, out, i=i: self._put("resid", i, self._pooled(out)))
                )
            if "mlp_in" in self.kinds:
                handles.append(
                    block.mlp.c_fc.register_forward_pre_hook(
                        lambda m, a, i=i: self._put("mlp_in", i, self._pooled(a[0]))
                    )
                )
            if "mlp_hidden" in self.kinds:
                handles.append(
                    block.mlp.c_proj.register_forward_pre_hook(
                        lambda m, a, i=i: self._put("mlp_hidden", i, self._pooled(a[0]))
                    )
                )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def take(self, final: Tensor) -> Activations:
        """The recorded batches joined (``final``: the embeddings of the same inputs); clears."""
        out = Activations(final.float().cpu())
        for kind in self.kinds:
            per_layer = self.store.get(kind, {})
            setattr(out, kind, torch.stack([torch.cat(per_layer[i]) for i in self.layers], dim=1))
        self.store = {}
        return out


def _float_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else (mask if mask.dtype == torch.bool else mask.float())


def pooled_text_positions(model: nn.Module, tokens: Tensor) -> Tensor:
    """``[B]`` the position a CLIP text tower pools at (its end-of-text token)."""
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    if pool == "last":
        return torch.full((len(tokens),), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    if pool == "first":
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    raise TypeError(f"text_pool_type {pool!r} has no single pooled token")


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown activation kinds {unknown}; expected some of {KINDS}")
    return tuple(kinds)


@contextmanager
def recording(
    model: nn.Module, tower: str, kinds: Sequence[str] = ("heads",), layers: Sequence[int] | None = None
) -> Iterator[_Recorder]:
    """Hooks on a tower for the duration of the block: run any forward passes (``encode_text``,
    ``encode_image``, the evaluation's encoders), then ``recorder.take(final)``."""
    _check_tower(tower)
    recorder = _Recorder(model, tower, _check_kinds(kinds), None if layers is None else tuple(layers))
    with recorder.hooks():
        yield recorder


def text_activations(
    bundle: ClipBundle,
    texts: Sequence[str],
    kinds: Sequence[str] = ("heads",),
    batch_size: int = 256,
    progress: bool | None = False,
    layers: Sequence[int] | None = None,
) -> Activations:
    """Activations of the text tower at the end-of-text token of each caption (encoded by
    :func:`saferclip.evaluation.encode_texts`); ``layers``: only these blocks (default all)."""
    if not texts:
        raise ValueError("no texts to encode")
    with recording(bundle.model, "text", kinds, layers) as rec:
        final = encode_texts(bundle, list(texts), batch_size, progress=progress, desc="captions (activations)")
        return rec.take(final)


def image_tensor_activations(
    bundle: ClipBundle, images: Tensor, kinds: Sequence[str] = ("heads",), layers: Sequence[int] | None = None
) -> Activations:
    """Activations of the vision tower at the class token of preprocessed images ``[B, 3, H, W]``
    (one batch, in memory)."""
    param = next(bundle.model.parameters())
    with torch.no_grad(), eval_mode(bundle.model), recording(bundle.model, "image", kinds, layers) as rec:
        final = bundle.model.encode_image(images.to(param.device, param.dtype), normalize=True)
        return rec.take(F.normalize(final.float(), dim=-1))


def image_activations(
    bundle: ClipBundle,
    paths: Sequence[str | Path],
    kinds: Sequence[str] = ("heads",),
    batch_size: int = 256,
    num_workers: int = 0,
    field: str | None = None,
    progress: bool | None = False,
    layers: Sequence[int] | None = None,
) -> Activations:
    """Activations of the vision tower at the class token of image files (read and encoded by
    :func:`saferclip.evaluation.encode_image_files`: errors name the file)."""
    if not paths:
        raise ValueError("no images to encode")
    with recording(bundle.model, "image", kinds, layers) as rec:
        final = encode_image_files(
            bundle, list(paths), batch_size, num_workers, progress, desc="images (activations)", field=field
        )
        return rec.take(final)


def activations(
    bundle: ClipBundle,
    tower: str,
    inputs: Sequence[Any],
    kinds: Sequence[str] = ("heads",),
    batch_size: int = 256,
    num_workers: int = 0,
    layers: Sequence[int] | None = None,
    progress: bool | None = False,
) -> Activations:
    """Captions (``tower="text"``) or image files (``tower="image"``); ``layers``: only these
    blocks (their activations are stacked in that order)."""
    _check_tower(tower)
    if tower == "text":
        return text_activations(bundle, list(inputs), kinds, batch_size, progress, layers)
    return image_activations(bundle, list(inputs), kinds, batch_size, num_workers, progress=progress, layers=layers)

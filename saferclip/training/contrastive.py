"""CLIP's symmetric contrastive loss (InfoNCE), DDP-aware: what the cross-modal terms of
:mod:`.losses` and HySAC's Lorentzian contrastive terms (:mod:`.hysac`) are made of.

Distributed InfoNCE: pass ``gather`` (:func:`gather_with_grad` below, or Lightning's
``lambda x: module.all_gather(x, sync_grads=True)``). Each rank then scores its *local* rows
against the gathered gallery and returns the mean over its local rows. With DDP's gradient
averaging (mean over ranks) this gives exactly the single-process gradient of the loss on the
global batch, provided every rank has the same local batch size (all_gather needs that
anyway): mean_r (1/B) Σ_{i∈r} ce_i = (1/(W·B)) Σ_i ce_i. Do not sum the per-rank losses or
scale them by the world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Gather = Callable[[Tensor], Tensor]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` ``[B, ...]`` from every rank into ``[W·B, ...]`` (rank order), keeping the
    autograd graph so gradients flow back to the rank that owns each row. Identity when
    torch.distributed is not initialised or has one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gathered(x: Tensor, gather: Gather | None) -> Tensor:
    """``x`` ``[B, ...]`` with every rank's rows, ``[W·B, ...]`` (``x`` itself when ``gather`` is
    None); ``gather`` may stack ranks (Lightning's ``[W, B, ...]``) or concatenate them."""
    if gather is None:
        return x
    out = gather(x)
    # Lightning's all_gather stacks ranks as [W, B, D]; ours concatenates as [W·B, D].
    if out.dim() == x.dim() + 1:
        out = out.flatten(0, 1)
    if out.dim() != x.dim() or out.shape[1:] != x.shape[1:] or out.shape[0] % max(x.shape[0], 1):
        raise ValueError(
            f"gather returned shape {tuple(out.shape)} for a local tensor {tuple(x.shape)}: expected "
            f"[W*B, D] or [W, B, D] (every rank must have the same local batch size)"
        )
    return out


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def infonce(
    a: Tensor,
    b: Tensor,
    logit_scale: float = 100.0,
    gather: Gather | None = None,
    rank: int | None = None,
    pairwise: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Symmetric CLIP loss between paired rows of ``a`` and ``b`` (scalar).

    ``(CE(s·a Bᵀ, y) + CE(s·b Aᵀ, y)) / 2`` where A, B are the gathered galleries (the local
    batch when ``gather`` is None) and ``y`` the local rows' positions in them
    (``arange(B) + rank·B``), like open_clip's ``ClipLoss(local_loss=True,
    gather_with_grad=True)``. The result is the mean over local rows; see the module docstring
    for why averaging it over ranks (DDP) reproduces the single-process gradient.

    Args:
        a, b: ``[B, D]`` L2-normalised, row i of ``a`` pairs with row i of ``b``.
        logit_scale: fixed temperature inverse (100 in Safe-CLIP).
        gather: callable returning the rows of all ranks, ``[W·B, D]`` or ``[W, B, D]``, with
            gradients (``gather_with_grad``, or Lightning's ``all_gather(x, sync_grads=True)``).
        rank: this process's position in the gathered tensor; default torch.distributed's rank
            (0 when not initialised).
        pairwise: the similarity ``[B, D] x [N, D] -> [B, N]`` the logits are made of (default:
            the dot product; HySAC passes the negative geodesic distance). ``logit_scale`` may
            then be a learnt tensor.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"infonce needs two [B, D] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    all_a, all_b = gathered(a, gather), gathered(b, gather)
    local = a.shape[0]
    world = all_a.shape[0] // max(local, 1)
    if gather is None:
        rank = 0  # local loss: the gallery is this rank's batch whatever the process rank
    elif rank is None:
        rank = _default_rank()
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the gathered world of {world} ranks")
    labels = torch.arange(local, device=a.device) + rank * local
    if pairwise is None:
        loss_a = F.cross_entropy(logit_scale * a @ all_b.T, labels)
        loss_b = F.cross_entropy(logit_scale * b @ all_a.T, labels)
    else:
        loss_a = F.cross_entropy(logit_scale * pairwise(a, all_b), labels)
        loss_b = F.cross_entropy(logit_scale * pairwise(b, all_a), labels)
    return (loss_a + loss_b) / 2

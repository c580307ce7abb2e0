"""Batched encoding for evaluation: normalised float32 features, with progress bars.

Images are read and preprocessed in DataLoader workers, captions tokenised in batches. The
loop is the plain open_clip one (``encode_image`` / ``encode_text`` per batch, as
:func:`saferclip.model.build.encode_images` / :func:`~saferclip.model.build.encode_text`); what it adds
is worker-side image loading, a progress bar, eval mode, and errors that name the item.
``scripts/bench_eval_encoding.py`` checks its throughput against the plain loop.

An unreadable image raises :class:`~saferclip.data.DataFormatError` naming the file, the item
and the field, also from a worker process (PyTorch would otherwise turn it into a
RuntimeError carrying a worker traceback as its message).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ..console import show_progress
from ..data.images import ImageFiles
from ..data.records import DataFormatError
from ..errors import SaferclipError
from ..model.build import ClipBundle, encode_tokens, eval_mode


class EvaluationError(SaferclipError):
    """Input an evaluation cannot use (a class with no images, a non-finite embedding, …)."""


# ----------------------------------------------------------------------------- worker-safe errors
@dataclass(frozen=True)
class _Failure:
    """A DataFormatError caught in a worker, carried to the main process as plain data."""

    file: str
    row: Any
    field: str | None
    text: str

    def reraise(self) -> None:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        where += f", field {self.field!r}" if self.field is not None else ""
        raise DataFormatError(self.file, self.text.removeprefix(where + ": "), row=self.row, field=self.field)


class _Guarded(Dataset):
    """Wraps a dataset so that DataFormatError travels through workers intact."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except DataFormatError as e:
            return _Failure(e.file, e.row, e.field, str(e))


def _collate(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return default_collate(items)


# ----------------------------------------------------------------------------- encoding
def embed_dim(bundle: ClipBundle) -> int:
    dim = int(bundle.model_cfg.get("embed_dim") or 0)
    if dim:
        return dim
    device = next(bundle.model.parameters()).device
    with torch.inference_mode():
        return int(bundle.model.encode_text(bundle.tokenizer(["a"]).to(device)).shape[-1])


def _finish(features: Tensor, start: int, what: str, bundle: ClipBundle, modality: str) -> Tensor:
    # embedded in float32 (for a Euclidean CLIP: normalised): an fp16 / bf16 model's own
    # normalisation is coarser
    features = features.float()
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten() + start).tolist()
        raise EvaluationError(
            f"non-finite (NaN/inf) {what} embeddings for items {rows[:5]}"
            f"{f' and {len(rows) - 5} more' if len(rows) > 5 else ''}; check the model weights"
        )
    return bundle.similarity.embed(features, modality).cpu()


def _progress(total: int, desc: str, progress: bool | None) -> tqdm:
    # a bar on a terminal only: none in logs and tests (saferclip.console.show_progress)
    return tqdm(
        total=total, desc=desc, unit="item", dynamic_ncols=True, leave=False, disable=not show_progress(progress)
    )


def encode_texts(
    bundle: ClipBundle,
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool | None = None,
    desc: str = "texts",
) -> Tensor:
    """Text embeddings ``[N, D]`` (``bundle.similarity.embed``: L2-normalised for a Euclidean
    CLIP), float32 on the CPU, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(bundle.model.parameters()).device
    out = []
    with eval_mode(bundle.model), torch.inference_mode(), _progress(len(texts), desc, progress) as bar:
        for start in range(0, len(texts), batch_size):
            tokens = bundle.tokenizer(list(texts[start : start + batch_size])).to(device)
            out.append(_finish(encode_tokens(bundle.model, tokens, normalize=False), start, desc, bundle, "text"))
            bar.update(len(out[-1]))
    return torch.cat(out) if out else torch.empty(0, embed_dim(bundle))


def encode_image_dataset(
    bundle: ClipBundle,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "images",
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Image embeddings ``[N, D]`` (as :func:`encode_texts`), float32 on the CPU, in dataset order.

    ``dataset`` items are preprocessed images ``[3, H, W]``, or tuples whose first element is
    one (``(image, label)`` as :class:`saferclip.data.ZeroShotImages`). ``return_labels``:
    also return the second elements, ``[N]`` (for a dataset of ``(image, label)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(bundle.model.parameters())
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        empty = torch.empty(0, embed_dim(bundle))
        return (empty, torch.empty(0, dtype=torch.long)) if return_labels else empty
    # workers only when there is more than one batch: starting them costs more than it saves
    workers = num_workers if n > batch_size else 0
    loader = DataLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=param.device.type == "cuda",
        persistent_workers=False,
    )
    out: list[Tensor] = []
    labels: list[Tensor] = []
    start = 0
    with eval_mode(bundle.model), torch.inference_mode(), _progress(n, desc, progress) as bar:
        for batch in loader:
            if isinstance(batch, _Failure):
                batch.reraise()
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if return_labels:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise ValueError(f"{desc}: return_labels needs dataset items (image, label)")
                labels.append(torch.as_tensor(batch[1]).long())
            x = images.to(device=param.device, dtype=param.dtype, non_blocking=True)
            out.append(_finish(bundle.model.encode_image(x), start, desc, bundle, "image"))
            start += len(x)
            bar.update(len(x))
    features = torch.cat(out)
    return (features, torch.cat(labels)) if return_labels else features


def encode_image_files(
    bundle: ClipBundle,
    paths: Sequence[str | Path],
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "images",
    ids: Sequence[Any] | None = None,
    field: str | None = None,
) -> Tensor:
    """Features ``[N, D]`` of image files (see :func:`encode_image_dataset`); ``ids`` and
    ``field`` name the record and attribute of a file that cannot be read."""
    return encode_image_dataset(
        bundle, ImageFiles(paths, bundle.preprocess, ids, field), batch_size, num_workers, progress, desc
    )

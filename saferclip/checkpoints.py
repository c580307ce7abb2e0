"""Safe reading and atomic writing of weights and small files.

Every user-supplied weights file goes through :func:`load_state_dict`: safetensors, or a
torch file loaded with ``weights_only=True``. A file that needs pickle to load (arbitrary
code execution) is refused, and so is a truncated or foreign file, with a message naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# A compact token table: only the rows of the token embedding that the data uses are stored,
# with their ids in this tensor. open_clip's 49k-row table would otherwise dominate a tiny
# model's file (DESIGN.md §4). Loading scatters the rows back into a full-size table.
COMPACT_IDS_SUFFIX = ".compact_row_ids"


class CheckpointError(ValueError):
    """A weights file that cannot be loaded safely or does not fit the model."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the final file should not be private
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state_dict(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Load weights without executing code from the file.

    Accepts ``.safetensors`` and torch files (``.pt``/``.pth``/``.bin``/``.ckpt``) that load
    with ``weights_only=True``. A Lightning checkpoint's ``state_dict`` entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _load_safetensors(path, map_location)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, the file needs pickle to load (it may run arbitrary code). "
            f"Convert it to safetensors, or re-save it with torch.save(state_dict) of tensors only. "
            f"Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable weights file (truncated or foreign format?): {str(e).splitlines()[0]}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated?): {e}") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def compact_token_embedding(state_dict: dict[str, torch.Tensor], keep_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep only rows ``keep_ids`` of every ``*token_embedding.weight`` (see COMPACT_IDS_SUFFIX)."""
    out = dict(state_dict)
    keep_ids = torch.as_tensor(keep_ids, dtype=torch.int64).unique()
    for key in [k for k in state_dict if k.endswith("token_embedding.weight")]:
        out[key] = state_dict[key][keep_ids].clone()
        out[key + COMPACT_IDS_SUFFIX] = keep_ids
    return out


def expand_token_embedding(
    state_dict: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Undo :func:`compact_token_embedding`: rows not stored are zero."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(COMPACT_IDS_SUFFIX)]:
        weight_key = key[: -len(COMPACT_IDS_SUFFIX)]
        ids = out.pop(key)
        if weight_key not in reference:
            raise CheckpointError(f"compact token table {weight_key!r} does not exist in the model")
        full = torch.zeros_like(reference[weight_key], dtype=out[weight_key].dtype)
        full[ids] = out[weight_key]
        out[weight_key] = full
    return out

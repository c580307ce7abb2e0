"""Safe reading and atomic writing of weights files.

Every user-supplied weights file goes through :func:`load_state_dict`: safetensors, or a
torch file loaded with ``weights_only=True``. A file that needs pickle to load (arbitrary
code execution) is refused, and so is a truncated or foreign file, with a message naming it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import SaferclipError
from ..files import atomic_path

log = logging.getLogger(__name__)

# A compact token table: only the rows of the token embedding that the data uses are stored,
# with their ids in this tensor. open_clip's 49k-row table would otherwise dominate a tiny
# model's file (docs/METHOD.md, "The toy world"). Loading scatters the rows back into a full-size table.
COMPACT_IDS_SUFFIX = ".compact_row_ids"
# What a weights file is called: a ``pretrained`` value with one of these suffixes names a file,
# never an open_clip tag (saferclip.model.build.is_path_like; the model card's public names).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(SaferclipError):
    """A weights file that cannot be loaded safely or does not fit the model."""


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
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place (same length).

    safetensors serialises the header from hash maps whose order changes from one process to
    the next, so the same tensors and metadata gave different bytes (and checksums) on every
    save; sorted, the same content is the same file. Readers locate tensors by the offsets in
    the header, never by its order. A header that would not keep its length is left as is."""
    import json

    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
        try:
            header = json.loads(raw)
        except ValueError:
            return
        ordered = {}
        if "__metadata__" in header:
            ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        ordered.update(sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length and len(raw.rstrip(b" ")) == len(text):
            f.seek(8)
            f.write(text + b" " * (length - len(text)))


def load_state_dict(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load weights without executing code from the file.

    Accepts safetensors and torch files that load with ``weights_only=True`` (the format is
    read from the file's first bytes, not its name). A checkpoint that wraps the weights
    (Lightning's ``.ckpt``, open_clip's training checkpoints: ``{"state_dict": ..., ...}``) is
    unwrapped; its other entries (optimizer state, loops, plain hyper-parameters) are
    ignored. ``prefix`` (``"model."``, ``"student."``) keeps only the weights under that
    attribute and strips it; without one, a ``module.`` prefix on every key (DDP) is
    stripped. Everything else fails with a :class:`CheckpointError` naming the file.

    Returns:
        parameter name -> tensor.
    """
    path = _existing_file(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        state_dict = _load_safetensors(path, str(map_location))
    elif kind in ("torch-zip", "torch-legacy"):
        obj = _torch_load(path, map_location)
        _verify_checkpoint(obj, path)
        state_dict = _unwrap_state_dict(obj, path)
    elif kind == "pickle":
        raise CheckpointError(
            f"{path}: refused, a plain pickle file (loading it may run arbitrary code), not a "
            f"torch or safetensors weights file. {_CONVERT_HINT}"
        )
    else:
        raise CheckpointError(f"{path}: {kind}, not a weights file (expected safetensors or a torch checkpoint)")
    return _select_prefix(state_dict, prefix, path)


def load_torch_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """A whole torch checkpoint (a Lightning ``.ckpt`` with its hyper-parameters, say), loaded
    with ``weights_only=True`` and the same checks and messages as :func:`load_state_dict`."""
    path = _existing_file(path)
    kind = sniff_format(path)
    if kind == "pickle":
        raise CheckpointError(
            f"{path}: refused, a plain pickle file (loading it may run arbitrary code). {_CONVERT_HINT}"
        )
    if kind not in ("torch-zip", "torch-legacy"):
        raise CheckpointError(
            f"{path}: {'a safetensors file' if kind == 'safetensors' else kind}, not a torch checkpoint"
        )
    obj = _torch_load(path, map_location)
    _verify_checkpoint(obj, path)
    return obj


CHECKSUM_KEY = "saferclip_checksum"


def state_dict_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The digest (:mod:`saferclip.integrity`) of a state dict: every tensor's name, dtype,
    shape and bytes, in key order. Training checkpoints carry it under ``saferclip_checksum``
    (the training module adds it on save); the loaders here verify it."""
    from ..integrity import digest_parts

    def parts():
        for name in sorted(state_dict):
            t = state_dict[name]
            yield f"{name}|{t.dtype}|{tuple(t.shape)}"
            yield t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()

    return digest_parts(parts())


def _verify_checkpoint(obj: Any, path: Path) -> None:
    """A checkpoint that records a checksum of its weights is used only when they match it."""
    if (
        isinstance(obj, Mapping)
        and isinstance(obj.get(CHECKSUM_KEY), str)
        and isinstance(obj.get("state_dict"), Mapping)
    ):
        if state_dict_checksum(obj["state_dict"]) != obj[CHECKSUM_KEY]:
            from ..integrity import DamagedArtefact

            raise DamagedArtefact(
                path, "training checkpoint: checksum mismatch, its weights changed since it was saved"
            )


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder, not a weights file (a folder in open_clip's hub layout is "
            f"loaded by build_clip(pretrained=folder))"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    return path


_CONVERT_HINT = (
    "Convert it to safetensors where you trust it (torch.load it there, then "
    "saferclip.model.checkpoints.save_state_dict), or re-save it as torch.save(state_dict) of tensors only."
)

# First bytes of formats people mistake for weights files, with what to call them.
_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF (WebP/WAV) file"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (Keras/TF weights?)"),
    (b"GGUF", "a GGUF file"),
)
# torch's legacy (pre-1.6, non-zip) format starts with a pickled magic number.
_MAX_HEADER = 100_000_000  # safetensors caps its header at 100 MB
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8"


def sniff_format(path: str | os.PathLike) -> str:
    """What a file holds, from its first bytes.

    Returns ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or ``"pickle"`` for files
    :func:`load_state_dict` may read, otherwise a description of the file for an error
    message (``"a PNG image"``, ``"a text file starting 'hello'"``). Raises
    :class:`CheckpointError` for a safetensors or zip file that is truncated or damaged.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors: an 8-byte little-endian header length (small), then a JSON object
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < _MAX_HEADER:
        _safetensors_header(path)  # raises if truncated / damaged
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path)
    if head.startswith(_TORCH_LEGACY_HEAD):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # a multi-byte character cut at byte 64 is still text
        text = head[:-3].decode("utf-8", errors="replace")
    if "\ufffd" in text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return "an unknown binary format"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer (the weights were not fetched: run `git lfs pull`)"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed or login-walled download?)"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting {first!r}"


def check_weights_file(path: str | os.PathLike) -> str:
    """A cheap check that a weights file can be loaded safely, without loading it (for dry
    runs): its format from the first bytes, a safetensors header that fits the file, a zip's
    directory. Returns the format; raises :class:`CheckpointError` naming the file."""
    path = _existing_file(path)
    kind = sniff_format(path)
    if kind == "pickle":
        raise CheckpointError(
            f"{path}: refused, a plain pickle file (loading it may run arbitrary code). {_CONVERT_HINT}"
        )
    if kind not in ("safetensors", "torch-zip", "torch-legacy"):
        raise CheckpointError(f"{path}: {kind}, not a weights file (expected safetensors or a torch checkpoint)")
    return kind


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: a damaged or truncated zip / torch file ({e})") from None
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "a NumPy .npz archive"
    return "a zip archive that is not a torch checkpoint"


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: the file must hold every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n >= _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (the header alone needs {8 + n} bytes, file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header ({e!r})") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        # a file object, not the path: torch >= 2.10 reads any "*.safetensors" path as safetensors
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:  # torch's own words for "this needs pickle"
            raise CheckpointError(
                f"{path}: damaged torch file ({msg.splitlines()[0] if msg else type(e).__name__})"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found and not _importable(found.group(1).split(".")[0]):
            # a truncated pickle stream cuts a name short ("collecti"): damage, not a class
            raise CheckpointError(
                f"{path}: not a readable torch file (truncated or damaged?): it names "
                f"{found.group(1)!r}, which no installed module provides"
            ) from None
        what = f" It holds a {found.group(1)} object." if found else ""
        raise CheckpointError(
            f"{path}: refused, the file needs pickle to load (it may run arbitrary code).{what} {_CONVERT_HINT}"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file (truncated or damaged?): {detail}") from None


def _importable(top_level: str) -> bool:
    """Whether a top-level module exists, without importing it."""
    if top_level in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top_level) is not None
    except (ImportError, ValueError):
        return False


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a mapping of parameter names to tensors")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        nested = [
            k
            for k, v in obj.items()
            if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
        ]
        hint = f"; tensors sit under {nested} (a wrapper this loader does not know)" if nested else ""
        raise CheckpointError(
            f"{path}: expected a mapping of parameter names to tensors, but {len(bad)} of {len(obj)} entries "
            f"are not (e.g. {bad[0]!r}: {type(obj[bad[0]]).__name__}){hint}"
        )
    return dict(obj)


def _select_prefix(state_dict: dict[str, torch.Tensor], prefix: str | None, path: Path) -> dict[str, torch.Tensor]:
    if prefix:
        p = prefix if prefix.endswith(".") else prefix + "."
        picked = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
        if not picked:
            tops = sorted({k.split(".", 1)[0] + "." for k in state_dict})
            raise CheckpointError(
                f"{path}: no weights under prefix {p!r}; the prefixes present are {', '.join(tops[:12]) or 'none'}"
            )
        if len(picked) < len(state_dict):
            log.info("%s: kept the %d of %d tensors under %r", path, len(picked), len(state_dict), p)
        return picked
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP wrapper
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _load_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (``{}`` if none)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size < 9:
        raise CheckpointError(f"{path}: no such safetensors file, or too short to be one")
    meta = _safetensors_header(path).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


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

"""The frozen-embedding cache's key: everything that decides its content, hashed.

``key`` hashes

- the model: architecture and :func:`saferclip.model.build.weights_fingerprint` (every weight byte),
  plus the dtype the weights run in;
- the data: captions in order, image paths in order, and each image file's size and
  modification time (``image_fingerprint="stat"``, the default). Reading the pixels of a
  100k-image set on every run would cost as much as a good part of the embedding itself;
  size + mtime catches every ordinary edit, copy or regeneration. What it misses is an
  in-place rewrite that keeps the byte count and resets the mtime (``cp -p``, ``touch -r``):
  ``image_fingerprint="content"`` hashes the bytes instead, for users who do that;
- the preprocessing (``repr`` of the transform) and tokenizer (type and context length);
- the storage dtype and the cache format version.

Same key, same embeddings; any change gives a new key, so nothing is ever read from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data.records import DataFormatError, QuadrupletSet
from ..errors import ConfigError
from ..model.build import ClipBundle, weights_fingerprint
from .cache_format import CACHE_FORMAT_VERSION, DTYPES

KEY_LENGTH = 24  # hex characters of the SHA-256 key used as the folder name


def cache_key(identity: dict[str, Any]) -> str:
    """The folder name of the cache :func:`cache_identity` describes: its SHA-256 (canonical JSON), shortened."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:KEY_LENGTH]


def describe_preprocess(preprocess: Callable) -> str:
    """``repr`` of the image transform, without memory addresses (they change every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


def describe_tokenizer(tokenizer: Callable) -> str:
    parts = [f"{type(tokenizer).__module__}.{type(tokenizer).__name__}"]
    for attr in ("context_length", "tokenizer_name", "vocab_size"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (int, str)):
            parts.append(f"{attr}={value}")
    return " ".join(parts)


def image_paths(qset: QuadrupletSet) -> dict[str, list[Path]]:
    """The image files the set's mode provides, per field; a missing path is an error naming the item."""
    out: dict[str, list[Path]] = {}
    wanted = [("safe_image", qset.mode.has_safe_images), ("unsafe_image", qset.mode.has_unsafe_images)]
    for name, present in wanted:
        if not present:
            continue
        paths = []
        for row, q in enumerate(qset.items):
            p = getattr(q, name)
            if p is None:
                raise DataFormatError(
                    qset.source,
                    f"mode {qset.mode.value!r} needs a {name.replace('_', ' ')}, item has none",
                    row=f"{row} (id {q.id})",
                    field=name,
                )
            paths.append(Path(p))
        out[name] = paths
    return out


def data_fingerprint(
    qset: QuadrupletSet, extra_safe_captions: Sequence[str] = (), image_fingerprint: str = "stat"
) -> str:
    """SHA-256 over captions, image paths and image file identity (size + mtime, or bytes).

    Item ids and the set's source name are left out: the cache is positional (row ``i`` is
    item ``i``) and only what is embedded decides its content.
    """
    if image_fingerprint not in ("stat", "content"):
        raise ConfigError(f"image_fingerprint must be 'stat' or 'content', got {image_fingerprint!r}")
    h = hashlib.sha256()
    h.update(
        f"mode={qset.mode.value};n={len(qset)};extra={len(extra_safe_captions)};img={image_fingerprint}\n".encode()
    )
    for texts in (qset.safe_captions, qset.unsafe_captions, list(extra_safe_captions)):
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must differ
        h.update(b"\1")
    for name, paths in image_paths(qset).items():
        for row, p in enumerate(paths):
            try:
                st = p.stat()
            except OSError:
                q = qset.items[row]
                raise DataFormatError(p, f"image file not found (item {row}, id {q.id}, {name})") from None
            h.update(f"{p}\0{st.st_size}\0".encode())
            if image_fingerprint == "stat":
                h.update(f"{st.st_mtime_ns}\0".encode())
            else:
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_identity(
    bundle: ClipBundle,
    qset: QuadrupletSet,
    extra_safe_captions: Sequence[str] = (),
    dtype: str = "float32",
    image_fingerprint: str = "stat",
) -> dict[str, Any]:
    """Everything that decides the cache's content; its hash is the cache key."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    param = next(bundle.model.parameters())
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": {
            "arch": bundle.arch,
            "weights_fingerprint": weights_fingerprint(bundle.model),
            "dtype": str(param.dtype),
        },
        "data": {
            "fingerprint": data_fingerprint(qset, extra_safe_captions, image_fingerprint),
            "image_fingerprint": image_fingerprint,
        },
        "preprocess": describe_preprocess(bundle.preprocess),
        "tokenizer": describe_tokenizer(bundle.tokenizer),
        "dtype": dtype,
    }

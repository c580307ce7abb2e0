"""Content checksums: a damaged file that saferclip wrote is never used.

Every artefact saferclip writes and later trusts (embedding-cache arrays, neighbour arrays,
detector files, the weight files of exports) records a fast content digest in its manifest
(``meta.json``, ``neighbours.json``, the detector's or export's JSON) when it is written, and
checks it when it is read. A flipped byte, a truncated or rotated array, NaNs written into
it: the digest no longer matches and the reader raises :class:`DamagedArtefact`, naming the
file. What the reader then does is its own choice: a cache or neighbour folder that saferclip
can rebuild is rebuilt after a one-line warning; a file it cannot rebuild (a detector, an
export someone handed you) is refused in one line (a console script exits 2).

The API (no dependency beyond numpy and xxhash; importable without Lightning or Hydra):

``digest_file(path) -> str``
    ``"xxh3_128:<32 hex>"`` of the file's bytes (read memory-mapped, in 64 MiB blocks).
``digest_bytes(data) -> str``, ``digest_array(arr) -> str``
    the same digest of a bytes-like object / of an array's C-order bytes (not its header).
``RunningDigest()``
    the same digest of bytes fed in order (``.update(data)``, then ``.value()``): a file
    hashed while it is written, never read back.
``digest_parts(parts) -> str``
    one digest over several strings / bytes / arrays (a checksum stored inside the file
    it covers: the detector's safetensors metadata holds the digest of its header + tensors).
``verify(path, expected, what=None) -> None``
    raise :class:`DamagedArtefact` when the file is missing or its digest is not
    ``expected``. Verified once per process: a file whose (path, size, mtime, inode) was
    already verified against the same digest is not read again (:func:`forget` drops it).
``digests(folder, names) -> {name: digest}``, ``verify_all(folder, expected, what=None)``
    the same over the files of one folder (a manifest's ``"checksums"`` mapping).
``check_finite(arr, path, what=None)``, ``check_index_range(arr, high, path, what=None)``
    the value checks a digest cannot make on a file written without one: no NaN / inf;
    every index in ``[0, high)``.
``DamagedArtefact(path, reason)``
    a :class:`~saferclip.errors.SaferclipError` (so a ``ValueError``) with ``.path`` and
    ``.reason``; its message is one line: ``<path>: damaged (<reason>)``.

Speed (``scripts/bench_checksum.py``): xxh3_128 hashes a memory-mapped file at several GB/s
per core, far above the disk, so verifying on load costs no more than the first read of the
file would (and leaves it in the page cache for that read).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import xxhash

from .errors import SaferclipError

ALGORITHM = "xxh3_128"
_BLOCK = 64 << 20  # bytes hashed per update: bounded memory for a memory-mapped file


class DamagedArtefact(SaferclipError):
    """A file saferclip wrote that no longer holds what was written (or was never complete)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: damaged ({reason})")


def _hasher():
    return xxhash.xxh3_128()


def _format(h) -> str:
    return f"{ALGORITHM}:{h.hexdigest()}"


def digest_bytes(data) -> str:
    """Digest of a bytes-like object."""
    h = _hasher()
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _BLOCK):
        h.update(view[start : start + _BLOCK])
    return _format(h)


class RunningDigest:
    """:func:`digest_bytes` of everything passed to :meth:`update`, in order."""

    def __init__(self) -> None:
        self._h = _hasher()

    def update(self, data) -> None:
        self._h.update(data)

    def value(self) -> str:
        return _format(self._h)


def digest_parts(parts) -> str:
    """One digest over several bytes-like objects / arrays in order (e.g. a file's JSON header
    and its tensors, for a checksum stored inside the file itself)."""
    h = _hasher()
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif not isinstance(part, (bytes, bytearray, memoryview)):
            part = np.ascontiguousarray(np.asarray(part)).reshape(-1).view(np.uint8)
        view = memoryview(part).cast("B")
        h.update(len(view).to_bytes(8, "little"))  # lengths: parts cannot trade bytes
        for start in range(0, len(view), _BLOCK):
            h.update(view[start : start + _BLOCK])
    return _format(h)


def digest_array(arr) -> str:
    """Digest of an array's values: its C-order bytes (dtype and shape are not included)."""
    arr = np.ascontiguousarray(np.asarray(arr))
    return digest_bytes(arr.reshape(-1).view(np.uint8)) if arr.size else _format(_hasher())


def digest_file(path: str | os.PathLike) -> str:
    """Digest of a file's bytes, read memory-mapped."""
    h = _hasher()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    for start in range(0, size, _BLOCK):
                        h.update(view[start : start + _BLOCK])
                finally:
                    view.release()
    return _format(h)


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks. Not a saferclip checksum: the identity
    a published record gives a file (an export's ``weights_sha256``, the input of a ViSU
    generation), which anyone can check with standard tools."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- verify, once per process
_verified: dict[tuple, str] = {}
_lock = threading.Lock()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def verify(path: str | os.PathLike, expected: str, what: str | None = None) -> None:
    """Raise :class:`DamagedArtefact` unless ``path`` exists and its digest is ``expected``.

    ``what`` (e.g. ``"embedding cache"``) prefixes the reason. A file already verified in this
    process, unchanged since (same size, mtime and inode), is not read again."""
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if not isinstance(expected, str) or not expected.startswith(ALGORITHM + ":"):
        raise DamagedArtefact(path, f"{prefix}no valid {ALGORITHM} checksum recorded for it (got {expected!r})")
    try:
        stamp = _stamp(path)
    except FileNotFoundError:
        raise DamagedArtefact(path, f"{prefix}missing") from None
    with _lock:
        if _verified.get(stamp) == expected:
            return
    actual = digest_file(path)
    if actual != expected:
        raise DamagedArtefact(path, f"{prefix}checksum mismatch, its content changed since it was written")
    with _lock:
        _verified[stamp] = expected


def forget(path: str | os.PathLike | None = None) -> None:
    """Drop ``path`` (or, with None, every file) from the verified-once memo."""
    with _lock:
        if path is None:
            _verified.clear()
            return
        name = str(Path(path).resolve())
        for stamp in [s for s in _verified if s[0] == name]:
            del _verified[stamp]


def digests(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: digest_file(folder / name)}``: a manifest's ``"checksums"`` mapping."""
    folder = Path(folder)
    out = {}
    for name in names:
        out[name] = digest_file(folder / name)
    return out


def remember(path: str | os.PathLike, digest: str) -> None:
    """Mark ``path`` as verified against ``digest`` (call it only for a file this process just
    wrote and renamed into place)."""
    path = Path(path)
    with _lock:
        _verified[_stamp(path)] = digest


def verify_all(folder: str | os.PathLike, expected: Mapping[str, str], what: str | None = None) -> None:
    """:func:`verify` each ``folder / name`` against ``expected[name]``."""
    if not isinstance(expected, Mapping):
        raise DamagedArtefact(
            folder, f"{what + ': ' if what else ''}no checksums recorded (written by an older saferclip?)"
        )
    folder = Path(folder)
    for name, digest in expected.items():
        if Path(name).name != name:  # a manifest edited to point outside its folder
            raise DamagedArtefact(folder, f"checksum entry {name!r} is not a file of this folder")
        verify(folder / name, digest, what)


# ----------------------------------------------------------------------------- value checks
def check_finite(arr, path: str | os.PathLike, what: str | None = None, block_rows: int = 65536) -> None:
    """Raise :class:`DamagedArtefact` naming ``path`` when a float array holds NaN / inf."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    flat = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    for start in range(0, len(flat), block_rows):
        block = flat[start : start + block_rows]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            prefix = f"{what}: " if what else ""
            raise DamagedArtefact(path, f"{prefix}non-finite (NaN/inf) values, first at row {row}")


def check_index_range(arr, high: int, path: str | os.PathLike, what: str | None = None) -> None:
    """Raise :class:`DamagedArtefact` naming ``path`` when an index is outside ``[0, high)``."""
    arr = np.asarray(arr)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise DamagedArtefact(path, f"{what + ': ' if what else ''}indices of dtype {arr.dtype}, expected integers")
    low, top = int(arr.min()), int(arr.max())
    if low < 0 or top >= high:
        prefix = f"{what}: " if what else ""
        bad = low if low < 0 else top
        raise DamagedArtefact(path, f"{prefix}index {bad} out of range [0, {high})")

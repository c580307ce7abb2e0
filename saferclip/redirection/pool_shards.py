"""The shards of a large embedded safe pool, in clip-retrieval's layout: opened as memory maps,
checked (every bad vector named by shard and row), read in chunks or by rows, with captions.

``text_emb/text_emb_<i>.npy`` ``[n_i, D]`` float16/float32 shards (L2-normalised) and
``metadata/metadata_<i>.parquet`` with a ``caption`` column and ``n_i`` rows (a flat folder of
``*.npy`` + ``*.parquet`` also works). No step holds every vector in memory. The index over
them is :mod:`saferclip.redirection.large_pool`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.records import DataFormatError
from ..errors import ConfigError

_DTYPES = (np.float16, np.float32)


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


# ----------------------------------------------------------------------------- the shards
@dataclass
class PoolShards:
    """``N`` safe caption embeddings ``[N, D]`` in memory-mapped ``.npy`` shards, in order."""

    root: Path
    files: list[Path]
    offsets: np.ndarray  # [S + 1] first row of each shard, then N
    dim: int
    metadata: list[Path]  # one parquet file per shard, or [] when the pool has no captions
    caption_column: str = "caption"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map ``[n_i, D]``."""
        return np.load(self.files[i], mmap_mode="r", allow_pickle=False)

    def chunks(self, rows: int = 262_144, reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 [<=rows, D])`` over the whole pool, one chunk in memory at a time.

        Every chunk is checked (:meth:`check`): a NaN or a vector that is not unit-length
        anywhere in the pool is a DataFormatError naming its shard and row. The shard is
        mapped afresh for each chunk, so the pages already read leave the process's resident
        memory (they stay in the page cache). ``reuse``: every chunk is written into the same
        buffer (no fresh pages to fault in for each chunk), valid until the next one."""
        buffer = np.empty((rows, self.dim), dtype=np.float32) if reuse else None
        for i in range(len(self.files)):
            size = int(self.offsets[i + 1] - self.offsets[i])
            for start in range(0, size, rows):
                source = self.shard(i)[start : start + rows]
                if buffer is None:
                    chunk = np.ascontiguousarray(source, dtype=np.float32)
                else:
                    chunk = buffer[: len(source)]
                    chunk[:] = source
                self.check(chunk, int(self.offsets[i]) + start)
                yield int(self.offsets[i]) + start, chunk

    def locate(self, row: int) -> tuple[Path, int]:
        """The shard file holding global row ``row`` and the row's position in it."""
        i = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.files[i], int(row - self.offsets[i])

    def check(self, vectors: np.ndarray, first_row: int | None = None, rows: np.ndarray | None = None) -> None:
        """Raise DataFormatError naming the shard and row of the first vector of ``vectors [n, D]``
        that is not finite or not L2-normalised; its global rows are ``first_row + arange(n)``
        or ``rows``."""
        j = _first_bad_row(vectors)
        if j is not None:
            _refuse_row(*self.locate(int(rows[j]) if rows is not None else int(first_row) + j), vectors[j])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of global rows ``ids`` (any shape of ints) as float32 ``[*ids.shape, D]``."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == i)
            local = flat[sel] - self.offsets[i]
            # sorted reads through a map opened for this call: kept open, the pages it faults in
            # (with the kernel's fault-around, most of a shard) would stay in the process's
            # resident memory, up to the whole store; re-opening costs ~1.5x on the gather
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.shard(int(i))[local[order]]
        return out.reshape(*ids.shape, self.dim)

    def captions(self, ids: np.ndarray) -> list[str]:
        """The captions of global rows ``ids`` (1-d), from the parquet metadata."""
        if not self.metadata:
            raise ConfigError(f"{self.root}: the pool has no metadata/*.parquet, so its captions are unknown")
        import pyarrow.parquet as pq

        ids = np.asarray(ids, dtype=np.int64)
        out: list[str | None] = [None] * len(ids)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == i)
            column = pq.read_table(self.metadata[i], columns=[self.caption_column]).column(0)
            for j in sel:
                out[j] = column[int(ids[j] - self.offsets[i])].as_py()
        for j, text in enumerate(out):
            if not isinstance(text, str) or not text.strip():
                i = int(shard_of[j])
                raise DataFormatError(
                    self.metadata[i],
                    "empty or missing caption",
                    row=int(ids[j] - self.offsets[i]),
                    field=self.caption_column,
                )
        return [t.strip() for t in out]  # type: ignore[union-attr]

    def identity(self) -> dict:
        """What decides the pool's content: shard names, sizes and modification times."""
        files = [*self.files, *self.metadata]
        return {"root": str(self.root), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def open_pool(path: str | Path, caption_column: str = "caption") -> PoolShards:
    """Open a clip-retrieval embedding folder (``text_emb/*.npy`` + ``metadata/*.parquet``, or a
    flat folder of both). Every shard must be 2-d float16/float32 with one width; a metadata file
    per shard with as many rows. Raises DataFormatError naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "safe pool folder not found (expected text_emb/*.npy, metadata/*.parquet)")
    emb_dir = root / "text_emb" if (root / "text_emb").is_dir() else root
    meta_dir = root / "metadata" if (root / "metadata").is_dir() else root
    files = sorted(emb_dir.glob("*.npy"), key=_natural_key)
    if not files:
        raise DataFormatError(emb_dir, "no embedding shards (*.npy) in the safe pool folder")
    metadata = sorted(meta_dir.glob("*.parquet"), key=_natural_key)
    if metadata and len(metadata) != len(files):
        raise DataFormatError(meta_dir, f"{len(metadata)} metadata files for {len(files)} embedding shards")
    counts, dim = [], None
    for i, f in enumerate(files):
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataFormatError(f, f"not a readable .npy array ({' '.join(str(e).split())})") from None
        if arr.ndim != 2 or arr.dtype not in _DTYPES:
            raise DataFormatError(f, f"expected a 2-d float16/float32 [n, D] array, got {arr.dtype} {arr.shape}")
        if dim is None:
            dim = arr.shape[1]
        elif arr.shape[1] != dim:
            raise DataFormatError(f, f"{arr.shape[1]}-d vectors, but {files[0].name} holds {dim}-d ones")
        head = np.asarray(
            arr[: min(len(arr), 1024)], dtype=np.float32
        )  # a quick look; check_pool_vectors reads every row
        j = _first_bad_row(head)
        if j is not None:
            _refuse_row(f, j, head[j])
        counts.append(len(arr))
        if metadata:
            import pyarrow.parquet as pq

            try:
                info = pq.ParquetFile(metadata[i])
            except Exception as e:  # pyarrow raises its own types for a damaged file
                raise DataFormatError(
                    metadata[i], f"not a readable parquet file ({' '.join(str(e).split())})"
                ) from None
            if caption_column not in info.schema_arrow.names:
                raise DataFormatError(
                    metadata[i], f"no column {caption_column!r}; columns are {info.schema_arrow.names}"
                )
            if info.metadata.num_rows != len(arr):
                raise DataFormatError(
                    metadata[i], f"{info.metadata.num_rows} rows, but {f.name} holds {len(arr)} vectors"
                )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PoolShards(root, files, offsets, int(dim), metadata, caption_column)


def _first_bad_row(vectors: np.ndarray) -> int | None:
    """The index of the first row of ``vectors [n, D]`` that is not finite or not L2-normalised."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float32))
    bad = np.flatnonzero(~(np.abs(norms - 1) < 2e-2))  # a NaN or inf anywhere in a row fails this too
    return int(bad[0]) if len(bad) else None


def _refuse_row(file: Path, row: int, vector: np.ndarray) -> None:
    """The one error for a bad pool vector: its shard, its row within the shard, what is wrong."""
    vector = np.asarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise DataFormatError(file, "non-finite values (NaN or inf) in a pool vector", row=row)
    norm = float(np.sqrt(vector @ vector))
    raise DataFormatError(file, f"vectors must be L2-normalised, this one has norm {norm:.4g}", row=row)


def check_pool_vectors(shards: PoolShards, rows: int = 262_144) -> None:
    """Every vector of the pool finite and L2-normalised, read chunk by chunk (:func:`open_pool`
    looks at each shard's first rows only): a DataFormatError naming the shard and the row.
    ``saferclip-train dry_run=true`` runs it; :func:`build_pool_index` needs no separate pass,
    since its training sample and every chunk it adds are checked the same way (a NaN row
    would otherwise stop FAISS's k-means with its own error)."""
    for _ in shards.chunks(rows, reuse=True):
        pass


def check_pool_width(shards: PoolShards, dim: int, model: str) -> None:
    """The pool's vectors as wide as the model's caption embeddings (a ConfigError naming the pool)."""
    if shards.dim != dim:
        raise ConfigError(
            f"method.neighbours.extra_pool: {shards.root} holds {shards.dim}-d vectors, but {model} embeds captions "
            f"in {dim}-d; embed the pool with the model being trained (clip-retrieval inference)"
        )

"""Atomic writes: a file or a whole folder appears complete or not at all.

Checkpoints, caches, neighbour indexes, exports, reports and the toy world are all written
through these two context managers, so a crash or a kill mid-write never leaves a half file
where a reader (or the next run) would take it for a whole one, and nothing the user has is
replaced unless the caller says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    mode = 0o666 & ~_umask()
    os.chmod(tmp_path, mode)  # mkstemp makes 0600; the final file should not be private
    try:
        yield tmp_path
        # again: a writer may have replaced the file (safetensors' save_file recreates it 0600)
        os.chmod(tmp_path, mode)
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


def occupied(path: str | os.PathLike) -> bool:
    """Something is at ``path`` that a write would replace (an empty folder holds nothing)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


@contextmanager
def atomic_folder(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; when the body finishes, swap it in.

    An ``out`` that holds something is replaced only with ``replace`` (else FileExistsError,
    before the body runs), and only once the new folder is complete: until then the old one
    stays where it was, and if the final rename fails it is put back. If the body raises,
    the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    if occupied(out) and not replace:
        raise FileExistsError(f"{out}: already exists; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should not be private
    try:
        yield tmp
        _swap_in(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path, replace: bool) -> None:
    if not occupied(out):
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
        return
    if not replace:  # appeared while the body ran
        raise FileExistsError(f"{out}: already exists; pass force=True to replace it")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous folder back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the body.

    Two processes that would build the same artefact (two runs of a sweep sharing one cache
    folder) take it in turn: the second finds the first's result and reuses it, so it is built
    once. The operating system releases the lock when its holder dies (even by kill -9), so a
    crash never leaves it stuck; the lock file is removed on release (a killed
    holder's stays, empty, and is reused). Without ``fcntl`` (Windows) it does nothing: the builds then
    only race, each still atomic.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file meanwhile: lock the new one
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # leaves nothing behind; waiters see a new inode and retry
        os.close(fd)  # closing releases the lock


def remove_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed :func:`atomic_folder` / :func:`atomic_path` of ``out`` left beside
    it (its hidden ``.<name>.*.tmp`` and ``.<name>.old-*``); returns them. Only for a caller that
    holds the :func:`file_lock` of ``out``: no other process can be writing them then."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for path in out.parent.glob(f".{out.name}.*"):
        name = path.name[len(out.name) + 2 :]
        if not (name.endswith(".tmp") or name.startswith("old-")):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed

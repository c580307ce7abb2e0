"""saferclip.integrity: digests, verify-once, damage detection (no model needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from saferclip import integrity
from saferclip.errors import SaferclipError
from saferclip.integrity import DamagedArtefact


def _flip(path, offset, n=16):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the bytes differ


def test_digest_file_matches_bytes_and_array(tmp_path):
    arr = np.arange(100_000, dtype=np.float32).reshape(1000, 100)
    f = tmp_path / "a.bin"
    f.write_bytes(arr.tobytes())
    d = integrity.digest_file(f)
    assert d.startswith("xxh3_128:") and len(d) == len("xxh3_128:") + 32
    assert d == integrity.digest_bytes(arr.tobytes()) == integrity.digest_array(arr)
    assert integrity.digest_array(arr.T) == integrity.digest_array(np.ascontiguousarray(arr.T))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert integrity.digest_file(empty) == integrity.digest_bytes(b"")


def test_verify_detects_flipped_bytes_missing_and_bad_records(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.ones((64, 8), dtype=np.float32))
    d = integrity.digest_file(f)
    integrity.verify(f, d)
    integrity.forget(f)
    _flip(f, 200)
    with pytest.raises(DamagedArtefact, match="checksum mismatch") as e:
        integrity.verify(f, d, "embedding cache")
    assert isinstance(e.value, SaferclipError) and isinstance(e.value, ValueError)
    assert e.value.path == f and "checksum mismatch" in str(e.value) and str(f) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(DamagedArtefact, match="missing"):
        integrity.verify(tmp_path / "nope.npy", d)
    with pytest.raises(DamagedArtefact, match="no valid xxh3_128 checksum"):
        integrity.verify(f, None)
    with pytest.raises(DamagedArtefact, match="no checksums recorded"):
        integrity.verify_all(tmp_path, None)
    with pytest.raises(DamagedArtefact, match="not a file of this folder"):
        integrity.verify_all(tmp_path, {"../x.npy": d})


def test_verified_once_per_process(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(1 << 16))
    d = integrity.digest_file(f)
    calls = []
    real = integrity.digest_file
    monkeypatch.setattr(integrity, "digest_file", lambda p: calls.append(p) or real(p))
    for _ in range(5):
        integrity.verify(f, d)
    assert len(calls) == 1
    f.write_bytes(os.urandom(1 << 16))  # rewritten: new mtime, read again, and found different
    with pytest.raises(DamagedArtefact, match="checksum mismatch"):
        integrity.verify(f, d)
    assert len(calls) == 2


def test_value_checks(tmp_path):
    p = tmp_path / "w.npy"
    a = np.zeros((10, 3), dtype=np.float32)
    integrity.check_finite(a, p)
    a[7, 1] = np.nan
    with pytest.raises(DamagedArtefact, match="first at row 7"):
        integrity.check_finite(a, p, "weights")
    integrity.check_index_range(np.array([[0, 4]]), 5, p)
    with pytest.raises(DamagedArtefact, match=r"index 5 out of range \[0, 5\)"):
        integrity.check_index_range(np.array([[0, 5]]), 5, p)
    with pytest.raises(DamagedArtefact, match="index -1"):
        integrity.check_index_range(np.array([-1, 2]), 5, p)
    with pytest.raises(DamagedArtefact, match="expected integers"):
        integrity.check_index_range(np.array([0.5]), 5, p)

"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy world (seed 0, SMALL_SIZES), generated once per session. Treat it as read-only:
    tests that need a broken copy write it under their own ``tmp_path``."""
    return make_toy_world(tmp_path_factory.mktemp("toy_world") / "world", seed=0, sizes=SMALL_SIZES)

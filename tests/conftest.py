"""Fixtures shared by the test files (helper modules, ``tests/*_helpers.py``, hold plain functions only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy world (seed 0, SMALL_SIZES), generated once per session. Treat it as read-only:
    tests that need a broken copy write it under their own ``tmp_path``."""
    return make_toy_world(tmp_path_factory.mktemp("toy_world") / "world", seed=0, sizes=SMALL_SIZES)


@pytest.fixture
def one_thread():
    """torch on one thread for the test. The tiny models gain nothing from a second thread, and
    on a shared 2-core machine two OpenMP threads per process made a training step twenty times
    slower and a tiny UNet step ~100x slower (3.5 s vs 30 ms). Modules that train or run a
    pipeline use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker (scripts/test.sh runs two on a 2-core machine), torch and the
    subprocesses the tests start use one thread each: one worker per core, never two threads
    contending for a core (see ``one_thread``)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


QUICK_TIER_TIMEOUT = 300  # s; a test outside the slow tier that takes this long has hung


def why_no_gpu() -> str | None:
    """Why the ``gpu`` tests cannot run here (None: torch sees a CUDA device)."""
    import torch

    if torch.cuda.is_available():
        return None
    return f"needs a CUDA GPU; torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests not marked ``slow`` take seconds: give them a tighter time limit than the global
    ``timeout`` (pyproject.toml), unless they set their own with ``@pytest.mark.timeout``.
    Tests marked ``gpu`` are skipped, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    no_gpu = why_no_gpu() if gpu_tests else None
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(QUICK_TIER_TIMEOUT))
    if no_gpu:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=no_gpu))

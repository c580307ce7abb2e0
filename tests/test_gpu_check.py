"""scripts/gpu_check.py: the GPU timings run (in their reduced CPU form here), write the JSON
they promise, and say plainly what was not measured; FAISS's GPU status. Whether the GPU paths
give the right results is tests/test_gpu.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import pytest
import torch
from train_helpers import SUBPROCESS_BUDGET

from saferclip.redirection.faiss_search import build_neighbour_index, exact_neighbours_torch, faiss_gpu_status

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
NO_GPU = "not measured: no GPU"


def run_script(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_faiss_gpu_status_describes_the_loaded_faiss():
    status = faiss_gpu_status()
    assert status["faiss_version"] == faiss.__version__
    assert status["gpu_build"] == hasattr(faiss, "StandardGpuResources")
    assert status["usable"] == (status["gpu_build"] and status["gpus"] > 0)
    assert "faiss-cpu" in status["distributions"] or status["gpu_build"]
    gpu_dists = [n for n in status["distributions"] if n != "faiss-cpu"]
    if status["gpu_build"]:  # says how many GPUs it sees
        assert status["note"].startswith("FAISS GPU build") and (
            f"{status['gpus']} GPU(s)" in status["note"] or status["gpus"] == 0
        )
    elif gpu_dists:  # installed, yet the CPU build loaded: names the distribution to reinstall
        assert "overwrote" in status["note"] and gpu_dists[0] in status["note"]
    else:
        assert status["note"].startswith("no FAISS GPU build installed")


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="a FAISS GPU build is loaded")
def test_faiss_gpu_status_names_a_gpu_build_overwritten_by_faiss_cpu(monkeypatch):
    """faiss-gpu installed, yet the CPU build loaded (what one pip run with both leaves)."""
    from importlib import metadata

    real = metadata.version

    def version(name: str) -> str:
        return "1.15.1" if name == "faiss-gpu" else real(name)

    monkeypatch.setattr(metadata, "version", version)
    status = faiss_gpu_status()
    assert status["distributions"]["faiss-gpu"] == "1.15.1"
    assert not status["usable"]
    assert "overwrote" in status["note"]
    assert "pip install --force-reinstall --no-deps faiss-gpu==1.15.1" in status["note"]


def test_exact_torch_search_on_a_named_device_matches_faiss():
    generator = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(2000, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(100, 32, generator=generator), dim=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = exact_neighbours_torch(queries, pool, k=3, chunk=64, device=device)
    reference = build_neighbour_index(queries, pool, k=3, device="cpu")
    assert ours.device == device and ours.indices.device.type == "cpu"
    assert torch.equal(ours.indices, reference.indices)
    assert torch.allclose(ours.similarities, reference.similarities, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_every_gpu_measurement_is_skipped_and_nothing_fails(tmp_path):
    out = tmp_path / "check.json"
    proc = run_script("--device", "cuda", "--json", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["gpu"] == NO_GPU and report["gpu_figures_measured"] is False
    assert {c["part"] for c in report["checks"]} == {1, 2, 3, 4}
    assert all(c["status"].startswith("skipped: --device cuda, but torch") for c in report["checks"])
    assert report["counts"] == {"measured": 0, "failed": 0, "skipped": len(report["checks"])}
    assert "GPU figures: not measured: --device cuda, but torch" in proc.stdout


@pytest.mark.slow
def test_cpu_form_runs_every_measurement_and_reports_it(tmp_path):
    """The whole script on the CPU, so it cannot rot before a GPU runs it: every measurement
    finishes (timing targets are figures, never failures) and the JSON holds its figures."""
    out = tmp_path / "check.json"
    proc = run_script(
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
        str(out),
        "--work-dir",
        str(tmp_path),
        cwd=tmp_path,
        timeout=SUBPROCESS_BUDGET,  # within the test's 600 s limit: 2 to 5 min on the shared 2-core machine
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["preset"] == "cpu"
    assert report["gpu"] == NO_GPU and report["gpu_figures_measured"] is False
    assert report["versions"]["torch"] == torch.__version__ and report["faiss"]["faiss_version"]
    checks = report["checks"]
    assert [c["status"] for c in checks] == ["measured"] * len(checks), [(c["name"], c["status"]) for c in checks]
    assert report["finished"] is True
    by_part = {p: [c for c in checks if c["part"] == p] for p in range(1, 5)}
    assert all(by_part.values())
    for c in by_part[1]:
        f = c["figures"]
        assert f["median_s"]["lightning"] > 0 and f["median_s"]["bare"] > 0
        assert c["target"].startswith("<= 1.05: ")
    assert {c["figures"]["precision"] for c in by_part[1]} == {"bf16-mixed", "32-true"}
    cache = by_part[2][0]["figures"]
    assert cache["ratio"] > 0 and cache["max_diff"] < 1e-3 and cache["num_workers"] == 2
    neighbours = by_part[3][0]["figures"]
    assert neighbours["backend"] == "torch (cpu)" and neighbours["max_sim_diff"] < 1e-4
    stages = by_part[4][0]["figures"]["stages"]  # the rehearsal, on the micro model
    assert [r["stage"] for r in stages] == ["world", "cache", "neighbours", "train", "evaluation", "export"]
    assert all(r["items_per_s"] > 0 for r in stages)
    # one table, the plain statement that no GPU figure was measured, and where correctness is
    assert "#  check" in proc.stdout and "GPU: not measured: no GPU" in proc.stdout
    assert "python -m pytest -m gpu" in proc.stdout
    assert "GPU figures: not measured (no GPU here)" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("saferclip_gpu_check_")]  # scratch removed

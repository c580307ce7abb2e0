"""A plain (non-editable) install works: the wheel carries what the package needs (configs,
model configs, the toy base model), and the commands write under the working directory,
never inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import time_budget

REPO = Path(__file__).resolve().parents[1]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_wheel_install_runs_the_toy_pipeline_from_another_directory(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "somewhere" / "else"
    work.mkdir(parents=True)
    # the build writes build/ and *.egg-info next to its sources: build from a copy, not the checkout
    source = tmp_path / "source"
    shutil.copytree(REPO / "saferclip", source / "saferclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    left = time_budget()  # every step shares the test's time
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        capture_output=True, text=True, timeout=left(),
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("saferclip-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=left(),
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    package = site / "saferclip"
    shipped = files_under(package)
    assert {
        "assets/toy_base.safetensors",
        "conf/train.yaml",
        "conf/method/saferclip.yaml",
        "model_configs/saferclip-toy.json",
        "evaluation/templates/report.html.j2",
    } <= shipped

    # the installed copy, not the checkout: the wheel's folder first on the path
    env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("SAFERCLIP_HOME", None)
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")
    where = subprocess.run([sys.executable, "-c", "import saferclip; print(saferclip.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=min(60, left()))  # fmt: skip
    assert where.stdout.strip() == str(package / "__init__.py"), where.stdout + where.stderr

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(site / "bin" / args[0]), *args[1:]], env=env, cwd=work, capture_output=True, text=True, timeout=left()
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    run("saferclip-make-toy", "--small")
    assert (work / "data" / "toy" / "manifest.json").is_file()
    run(
        "saferclip-train",
        "debug=fast_dev_run",
        "data.toy_size=small",
        "model=micro",
        "trainer.enable_progress_bar=false",
    )
    assert list((work / "outputs" / "train").iterdir())  # the run folder, under the working directory
    assert list((tmp_path / "user-cache" / "saferclip").iterdir())  # the embedding cache, in the user cache
    assert files_under(package) == shipped  # nothing was written into the installed package

"""Helpers of the training tests: the real ``train`` config, shrunk to the micro model, the
small toy world, the CPU and a temporary folder; and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import default_collate

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.locations import BASE_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = BASE_CHECKPOINT

# a short real run: loggers are live (fast_dev_run switches them off)
SHORT_RUN = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "export=false",
)


def base_overrides(tmp: Path, toy_world: Path, cache_dir: Path | None = None) -> list[str]:
    return [
        "model=micro",
        f"paths.toy_dir={toy_world}",
        "data.toy_size=small",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        f"paths.run_dir={tmp / 'run'}",
        f"paths.cache_dir={cache_dir or tmp / 'cache'}",
        f"paths.output_dir={tmp / 'out'}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]


def compose_train(tmp: Path, toy_world: Path, *overrides: str, cache_dir: Path | None = None) -> DictConfig:
    """The ``train`` config as ``hydra.compose`` gives it (no @hydra.main, run_dir set)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*base_overrides(tmp, toy_world, cache_dir), *overrides])


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"
    )
    env.setdefault("WANDB_MODE", "disabled")
    env.update(extra)
    return env


# Every test fails after 600 s (pyproject.toml's `timeout`); the subprocesses one test starts
# share 540 s of it, so a hung one times out with its output before the test is killed.
SUBPROCESS_BUDGET = 540.0


def time_budget(seconds: float = SUBPROCESS_BUDGET) -> Callable[[], float]:
    """``left()``: what remains of ``seconds`` from now (at least 1 s), the timeout to give the
    next of the subprocesses a test runs one after another."""
    end = time.monotonic() + seconds
    return lambda: max(1.0, end - time.monotonic())


def installed_script(name: str) -> str:
    """The console script ``name`` installed beside this interpreter (the environment's own
    ``bin/``, found without PATH, so an unactivated venv's ``python -m pytest`` finds it too);
    an AssertionError when it is not there: a test of the script never stands in another way."""
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{name} is not installed in {script.parent} (pip install -e .)"
    return str(script)


def cli_command(*args: str, installed: bool = False) -> list[str]:
    """``python -m saferclip.app.commands.train``, or with ``installed`` the installed ``saferclip-train``
    console script (:func:`installed_script`)."""
    if installed:
        return [installed_script("saferclip-train"), *args]
    return [sys.executable, "-m", "saferclip.app.commands.train", *args]


def run_cli(
    args: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None, installed: bool = False
):
    """``saferclip-train <args>`` in a subprocess; returns (CompletedProcess, seconds)."""
    start = time.perf_counter()
    command = cli_command(*args, installed=installed)
    proc = subprocess.run(command, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def cli_overrides(tmp: Path, toy_world: Path, cache_dir: Path | None = None) -> list[str]:
    """The test overrides for the CLI, where Hydra makes the run folder (no paths.run_dir)."""
    return [o for o in base_overrides(tmp, toy_world, cache_dir) if not o.startswith("paths.run_dir=")]


def prepared(cfg: DictConfig):
    """Module and datamodule as train() builds them, the data set up."""
    from saferclip.app.engine.fit import build_datamodule, build_module
    from saferclip.app.hydra_utils import to_container
    from saferclip.training.method import method_config

    method = method_config(to_container(cfg.method))  # checked once, as train() does
    module, datamodule = build_module(cfg, method), build_datamodule(cfg, method)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return module, datamodule


def collate(dataset, indices) -> dict[str, torch.Tensor]:
    return default_collate([dataset[i] for i in indices])


def hand_merged(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A training checkpoint's CLIP weights with every LoRA update folded in by hand:
    ``W + (alpha / r) * B @ A``, the q rows of a packed q/k/v projection left as they were
    (the adapters update k and v only)."""
    trainable = checkpoint["hyper_parameters"]["method"]["trainable"]
    scale = trainable["lora_alpha"] / trainable["lora_r"]
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    merged = {k: v for k, v in state.items() if ".parametrizations." not in k}
    for key in (k for k in state if k.endswith(".original")):
        stem = key[: -len(".original")]  # <module>.parametrizations.<name>
        module, name = stem.split(".parametrizations.")
        delta = scale * state[f"{stem}.0.lora_B"] @ state[f"{stem}.0.lora_A"]
        if name == "in_proj_weight":
            delta[: delta.shape[0] // 3] = 0
        merged[f"{module}.{name}"] = state[key] + delta
    return merged


class PauseAtEpoch(L.Callback):
    """For the resume test: at the start of epoch ``epoch`` (the previous epoch's checkpoint
    is written by then) touch ``marker`` and sleep until the test kills the process."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, Path(marker)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.marker.write_text(str(os.getpid()))
            time.sleep(3600)

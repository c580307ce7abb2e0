"""Shared plumbing of the Hydra entry points: resolvers, config checks, logging set-up."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import locations
from ..errors import ConfigError
from ..model.build import check_arch

CONF_DIR = str(locations.CONF_DIR)
log = logging.getLogger("saferclip")


def _wandb_offline() -> bool:
    """Offline unless an API key is configured (env or ~/.netrc): never block on a login."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def register_resolvers() -> None:
    # where things live (saferclip.locations): the package's own files, the home for
    # generated data and outputs, the cache folder
    resolvers = {
        "saferclip_package": lambda: str(locations.PACKAGE_DIR),
        "saferclip_home": lambda: str(locations.home()),
        "saferclip_cache": lambda: str(locations.cache_dir()),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("saferclip_wandb_offline"):
        OmegaConf.register_new_resolver("saferclip_wandb_offline", _wandb_offline)


register_resolvers()


KNOWN_METHODS = ("saferclip", "safeclip")


def check_train_config(cfg: DictConfig) -> None:
    """Fail fast on what would otherwise fail minutes into a run."""
    if cfg.method.name not in KNOWN_METHODS:
        raise ConfigError(f"unknown method {cfg.method.name!r}; expected one of {KNOWN_METHODS}")
    if cfg.method.targets not in ("neighbours", "paired"):
        raise ConfigError(f"method.targets must be 'neighbours' or 'paired', got {cfg.method.targets!r}")
    if cfg.method.targets == "neighbours" and not cfg.method.get("neighbours"):
        raise ConfigError("method.targets=neighbours needs a method.neighbours section")
    try:
        check_arch(cfg.model.arch)
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None
    pretrained = cfg.model.pretrained
    if pretrained and ("/" in str(pretrained)) and not Path(str(pretrained)).exists():
        raise ConfigError(f"model.pretrained: weights file not found: {pretrained}")
    from ..training.losses import TERM_NAMES

    unknown = set(cfg.method.loss.weights) - set(TERM_NAMES)
    if unknown:
        raise ConfigError(f"method.loss.weights: unknown terms {sorted(unknown)}; known: {list(TERM_NAMES)}")
    if not cfg.data.get("make_toy", False):
        for split in ("train", "validation"):
            spec = cfg.data.splits.get(split)
            if spec is None:
                raise ConfigError(f"data.splits.{split} is missing")
            try:
                path = spec.path
            except Exception as e:  # an unset ??? path raises here, with a cryptic message
                raise ConfigError(f"data.splits.{split}.path is not set ({e}); set it on the command line") from None
            if not Path(path).exists():
                raise ConfigError(f"data.splits.{split}.path: no such file: {path}")


def _quiet_open_clip_random_init(record: logging.LogRecord) -> bool:
    # open_clip warns "initialized randomly" on every build without a tag, also when saferclip
    # loads the weights right after; the logs and reports name each model's real source instead
    # (and export's key check builds the architecture from a folder before the weights exist)
    return not record.getMessage().startswith(
        ("No pretrained weights loaded for model", "Local config loaded, but no CLIP weights")
    )


def setup_logging() -> None:
    if _quiet_open_clip_random_init not in logging.getLogger().filters:
        logging.getLogger().addFilter(_quiet_open_clip_random_init)
    # Lightning has its own console handler; without this every line shows twice
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).propagate = False
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every attempt at INFO
    # open_clip logs every model creation at INFO on the root logger
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("saferclip").setLevel(logging.INFO)


def to_container(cfg: DictConfig | None) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}

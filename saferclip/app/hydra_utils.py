"""What the engine, the pipelines and the commands share about the config tree: where it is,
its resolvers, the checks of a composed config (:func:`check_train_config` hands the typed
method config on), logging set-up. Imports no torch: a command's ``--help`` stays quick."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import locations
from ..config_resolvers import register_location_resolvers
from ..errors import ConfigError

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
    """The config tree's location resolvers (:mod:`saferclip.config_resolvers`) and the
    entry points' own ``${saferclip_wandb_offline:}``."""
    register_location_resolvers()
    if not OmegaConf.has_resolver("saferclip_wandb_offline"):
        OmegaConf.register_new_resolver("saferclip_wandb_offline", _wandb_offline)


register_resolvers()


def check_train_config(cfg: DictConfig):
    """Fail fast, in one line naming the key, on what would otherwise fail minutes into a
    run: the method (one schema: :func:`saferclip.training.method.method_config`), the
    model's architecture and weights path, the data config and its split paths, the trainer.
    Returns the checked method config (:class:`saferclip.training.method.MethodConfig`): the app
    hands that typed object on, it does not check the dict again."""
    from ..data.splits import check_data_config
    from ..evaluation.selection import DEFAULT_TAU, check_rank_by, check_tau
    from ..model.build import check_arch
    from ..training.method import method_config

    check_seed(_value(cfg, "seed"), "seed")
    for key in ("dry_run", "dry_run_verify_images", "force", "export"):
        if key in cfg:
            check_bool(_value(cfg, key), key)
    if cfg.data.get("make_toy", False):  # before anything resolves data.root, which names the pairing
        from ..toyworld.generate import check_toy_data
        from ..toyworld.pairing import DEFAULT_PAIRING

        check_toy_data(
            {"toy_size": cfg.data.get("toy_size", "default"), "toy_pairs": cfg.data.get("toy_pairs", DEFAULT_PAIRING)}
        )
    check_tau(_value(cfg, "selection.tau") if OmegaConf.select(cfg, "selection.tau") is not None else DEFAULT_TAU)
    if OmegaConf.select(cfg, "selection.rank_by") is not None:
        check_rank_by(_value(cfg, "selection.rank_by"))
    method = method_config(_container(cfg, "method"))
    try:
        check_arch(cfg.model.arch)
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None
    pretrained = cfg.model.pretrained
    if pretrained and ("/" in str(pretrained)) and not Path(str(pretrained)).exists():
        raise ConfigError(f"model.pretrained: weights file not found: {pretrained}")
    if cfg.model.get("precision", "fp32") not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"model.precision must be fp32, fp16 or bf16, got {cfg.model.precision!r}")
    if not cfg.data.get("make_toy", False):  # the split files first: the likeliest mistake
        for split in ("train", "validation"):
            path = _value(cfg, f"data.splits.{split}.path")
            if path is None:
                raise ConfigError(f"data.splits.{split} is missing")
            if not Path(path).exists():
                raise ConfigError(f"data.splits.{split}.path: no such file: {path}")
    check_data_config(_container(cfg, "data"))
    check_trainer_config(_container(cfg, "trainer"))
    return method


MAX_SEED = 2**32 - 1  # numpy's and Lightning's limit


def check_seed(value, key: str = "seed") -> int:
    """An integer in [0, 2**32 - 1], or a ConfigError naming ``key`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value


def check_int(value, key: str, minimum: int = 0) -> int:
    """An integer >= ``minimum`` (not a bool), or a ConfigError naming ``key`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(value, key: str) -> bool:
    """true or false, or a ConfigError (``force=no`` would otherwise read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_run_options(cfg: DictConfig, keys: tuple[str, ...] = ("seed", "batch_size", "num_workers", "force")) -> None:
    """The plain options of the eval / analyze / main / study configs, before any work."""
    checks = {
        "seed": lambda v: check_seed(v, "seed"),
        "batch_size": lambda v: check_int(v, "batch_size", 1),
        "num_workers": lambda v: check_int(v, "num_workers", 0),
        "force": lambda v: check_bool(v, "force"),
    }
    for key in keys:
        if key in cfg:
            checks[key](_value(cfg, key))


def check_seed_list(value, key: str, allow_empty: bool = False) -> list[int]:
    """A list of distinct seeds (:func:`check_seed`), or a ConfigError naming ``key``, the value
    and what was expected (``key=[0,1,2]``)."""
    from omegaconf import ListConfig

    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    expected = f"a list of distinct integers >= 0, e.g. {key}=[0,1,2]"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"{key} is empty: nothing would run; expected {expected}")
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{key}={list(value)}: {seed!r} is not a seed; expected {expected}")
    duplicates = sorted({s for s in value if list(value).count(s) > 1})
    if duplicates:
        raise ConfigError(
            f"{key}={list(value)}: seed(s) {duplicates} appear twice (each seed would be counted once); expected {expected}"
        )
    return list(value)


def check_trainer_config(trainer: dict) -> None:
    """The trainer keys a typo or a sign error would break only after the data work."""
    epochs = trainer.get("max_epochs", 1)
    if not (isinstance(epochs, int) and (epochs >= 1 or epochs == -1)):
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1 (or -1: no limit), got {epochs!r}")
    every = trainer.get("log_every_n_steps", 1)
    if not (isinstance(every, int) and every >= 1):
        raise ConfigError(f"trainer.log_every_n_steps must be an integer >= 1, got {every!r}")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = trainer.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"trainer.{key} must be a fraction in [0, 1] or a number of batches, got {value!r}")


def _container(cfg: DictConfig, key: str) -> dict:
    """``cfg[key]`` resolved to a plain dict; an unresolvable value (an unset ``???`` path)
    becomes a ConfigError naming it."""
    try:
        return to_container(cfg[key])
    except OmegaConfBaseException as e:
        raise unset_value_error(e) from None


def _value(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise unset_value_error(e) from None


def unset_value_error(error: OmegaConfBaseException) -> ConfigError:
    """A config value that cannot be resolved, in one line: which key needs which unset one."""
    import re

    key = getattr(error, "full_key", None) or "a config value"
    missing = re.search(r"Missing mandatory value: ([\w.]+)", str(error))
    if missing and missing.group(1) != key:
        return ConfigError(
            f"{key} needs {missing.group(1)}, which is not set; set it on the command line ({missing.group(1)}=...)"
        )
    if missing:
        return ConfigError(f"{key} is not set; set it on the command line ({key}=...)")
    return ConfigError(f"{key}: {' '.join(str(error).split())}")


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


def quiet_logging() -> None:
    """``--quiet``: warnings and errors only (no progress lines, no per-epoch lines)."""
    for name in ("saferclip", "lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


QUIET_FLAGS = ("--quiet", "-q")


def pop_quiet(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--quiet`` / ``-q``, and whether it was there."""
    rest = [a for a in argv if a not in QUIET_FLAGS]
    return rest, len(rest) != len(argv)


def to_container(cfg: DictConfig | None) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}


def resolved_value(cfg: DictConfig, key: str):
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        return to_container(value) if isinstance(value, DictConfig) else value
    except OmegaConfBaseException as e:
        # e.g. paths.visu: ??? left unset; the message names the key
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}; set it on the command line") from None


def config_dump(cfg: DictConfig) -> dict:
    """The run's config for the report, resolved where it can be (a key only Hydra's runtime
    can resolve stays as written)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)


def resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name

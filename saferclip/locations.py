"""Where saferclip finds what it ships and where it writes what it makes.

Shipped with the package (read-only, works after ``pip install .`` as from a checkout):
the Hydra configs (``conf/``), the tiny architectures (``model_configs/``), and the assets
(``assets/``: the toy world's base CLIP, prompt templates).

Written by the commands, never inside the installed package:

* generated data (the toy world) and outputs (runs, reports): under the *home*, which is
  ``$SAFERCLIP_HOME`` when set, else the working directory (``./data``, ``./outputs``);
* caches (frozen embeddings, neighbour indexes): ``$SAFERCLIP_CACHE_DIR``, else
  ``$SAFERCLIP_HOME/cache`` when a home is set, else the user cache folder
  (``$XDG_CACHE_HOME/saferclip`` or ``~/.cache/saferclip``): they are reused across projects
  and runs, keyed by model and data.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
BASE_CHECKPOINT = ASSETS_DIR / "toy_base.safetensors"


def home() -> Path:
    """``$SAFERCLIP_HOME``, else the working directory (absolute)."""
    return Path(os.environ.get("SAFERCLIP_HOME") or os.getcwd()).expanduser().absolute()


def data_dir() -> Path:
    """Generated data: ``<home>/data`` (the toy world goes to ``<home>/data/toy``)."""
    return home() / "data"


def cache_dir() -> Path:
    """Frozen-embedding caches and neighbour indexes (module docstring)."""
    if os.environ.get("SAFERCLIP_CACHE_DIR"):
        return Path(os.environ["SAFERCLIP_CACHE_DIR"]).expanduser().absolute()
    if os.environ.get("SAFERCLIP_HOME"):
        return home() / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().absolute() / "saferclip"


def toy_world_dir(toy_dir: str | os.PathLike, seed: int | str, pairing: str | None = None) -> Path:
    """The folder of the toy world made with generator seed ``seed`` and pairing preset
    ``pairing`` (:mod:`saferclip.toyworld.pairing`; None: the default one): world 0 of the
    default pairing is ``toy_dir`` itself, world k sits beside it as ``<toy_dir>-world<k>``,
    another pairing's as ``<toy_dir>-<pairing>`` and ``<toy_dir>-<pairing>-world<k>`` (one folder
    per world and pairing, so worlds used for tuning, for testing and for the pairing study
    never overwrite each other). A bad seed or pairing is a one-line ConfigError."""
    from .errors import ConfigError
    from .toyworld.pairing import DEFAULT_PAIRING, get_pairing

    try:
        seed = int(seed)
    except (TypeError, ValueError):
        seed = -1
    if seed < 0:
        raise ConfigError(f"data.toy_seed must be an integer >= 0, got {seed}")
    name = get_pairing(DEFAULT_PAIRING if pairing is None else pairing).name
    toy_dir = Path(toy_dir)
    stem = toy_dir.name if name == DEFAULT_PAIRING else f"{toy_dir.name}-{name}"
    return toy_dir.with_name(stem if seed == 0 else f"{stem}-world{seed}")

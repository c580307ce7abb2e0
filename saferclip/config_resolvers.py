"""The config tree's own ``${…}`` resolvers, registered with OmegaConf in one place.

The configs name where things live through ``${saferclip_package:}``, ``${saferclip_home:}``
and ``${saferclip_cache:}``, and the folder of each toy world through ``${saferclip_toy_world:…}``
(:mod:`saferclip.locations`). The Hydra entry points register
them before composing (:mod:`saferclip.app.hydra_utils`), and the export registers them to
resolve what a run's ``config_resolved.yaml`` left unresolved
(:func:`saferclip.export.run_records.read_run_config`): one table, so a config means the same
to both. OmegaConf only, not Hydra: the library stays importable without it.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import OmegaConf

from . import locations

# where things live: the package's own files, the home for generated data and outputs,
# the cache folder
LOCATION_RESOLVERS: dict[str, Callable[..., str]] = {
    "saferclip_package": lambda: str(locations.PACKAGE_DIR),
    "saferclip_home": lambda: str(locations.home()),
    "saferclip_cache": lambda: str(locations.cache_dir()),
    # the toy world of a generator seed and pairing preset: world 0 of the default pairing at
    # paths.toy_dir, the others beside it (a run config written before the pairing knob names
    # two arguments: the default pairing)
    "saferclip_toy_world": lambda toy_dir, seed, pairing=None: str(locations.toy_world_dir(toy_dir, seed, pairing)),
}


def register_location_resolvers() -> None:
    """Register :data:`LOCATION_RESOLVERS` with OmegaConf (those already registered are kept)."""
    for name, resolver in LOCATION_RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


__all__ = ["LOCATION_RESOLVERS", "register_location_resolvers"]

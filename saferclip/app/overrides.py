"""A command line's overrides checked against the command's config before any work: one
implementation for every Hydra command (``hydra_command``: train, index, eval, analyze, attack,
make-image-shards) and for the scripts that compose the tree themselves (main, study, tune).

What is refused, each in one line (a :class:`ConfigError`: exit code 2):

* a key the config does not hold, with or without ``+``, with the closest valid key
  ("trainer.max_epoch: no such key; did you mean trainer.max_epochs?");
* ``+key=value`` except where a key may be added (:data:`OPEN`): a free-form map whose entries
  are the user's own names (``models.<name>``), a section whose keys the library checks when
  it reads it (``method``, ``analysis``, ``attack``), an object built from its ``_target_``
  (``trainer``, each callback: the keyword arguments it takes), and the optional keys the data
  config may name (:data:`OPTIONAL_KEYS`);
* a config group the command does not use (``model=toy`` given to saferclip-eval), with the groups it
  has and the key it most likely meant; an option a group does not have (``method=nope``);
* an argparse-style option (``--max-epochs 3``), pointing at the ``key=value`` form.

Hydra's own options (``--cfg``, ``--info``, ``-m``, ...) and ``hydra.*`` keys are left to Hydra.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# Where ``+key=value`` may add keys the composed config does not hold. Everything below such a
# prefix is accepted here; what reads it refuses an unknown key in one line naming it.
# Maps whose entries are the user's own names (shown by --help, with how to add one):
FREE_FORM: dict[str, str] = {
    "models": "a model per name: +models.<name>.pretrained=<run folder, export or checkpoint> [+models.<name>.arch=<architecture>]",
    "callbacks": "a Lightning callback per name: +callbacks.<name>._target_=<class> and its arguments",
    "data.zeroshot": "a zero-shot task per name: '+data.zeroshot.<name>={type: folder, root: <folder>}'",
}
# Sections whose keys the library checks against its own schema when it reads them:
CHECKED: dict[str, str] = {
    "method": "the method's keys (saferclip.training.method)",
    "analysis": "the analysis settings",
    "attack": "the attack settings",
    "showcase": "the galleries' settings",
    "eval.showcase": "the galleries' settings",
}
OPEN: dict[str, str] = {**FREE_FORM, **CHECKED}
# Keys a config section may name without holding them by default (read with ``.get``).
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("image_shards", "memo_images"),
    "data.splits.*": ("path", "image_root", "unsafe_image_root", "split_dir", "image_ext", "distractor_images"),
}
# Hydra's own command-line options (``saferclip-train --hydra-help`` lists them); the value
# they take, when they take one, is the next argument.
HYDRA_FLAGS = {
    "--help": False, "-h": False, "--hydra-help": False, "--version": False, "--resolve": False, "--run": False,
    "-r": False, "--multirun": False, "-m": False, "--cfg": True, "-c": True, "--package": True, "-p": True,
    "--info": False, "-i": False, "--shell-completion": False, "-sc": False, "--config-path": True, "-cp": True,
    "--config-name": True, "-cn": True, "--config-dir": True, "-cd": True, "--experimental-rerun": True,
}  # fmt: skip


@dataclass(frozen=True)
class Parsed:
    """One override: ``+`` / ``++`` / ``~`` prefix, the key (dotted) or group, its text."""

    text: str
    key: str
    prefix: str  # "", "+", "++" or "~"
    value: Any  # the parsed value (a str for a group option), None for a deletion
    sweep: list[str] | None  # a sweep's options (``-m``), as text


# ----------------------------------------------------------------------------- entry points
def check_flags(prog: str, argv: Sequence[str], configs: Callable[[], Sequence[Mapping[str, Any]]] = tuple) -> None:
    """An option that is neither Hydra's nor the command's own (``--max-epochs 3``): one line
    saying the command takes ``key=value`` and, from ``configs()`` (plain dicts, composed only
    when needed), the key meant."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-") or arg == "--" or arg.split("=")[0] in HYDRA_FLAGS or _is_number(arg):
            continue
        name, _, value = arg.lstrip("-").partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            value = argv[i + 1]
        key = name.replace("-", "_")
        paths = [p for config in configs() for p in key_paths(config)]
        guess = _by_last_part(key, paths) or _closest(key, paths)
        shown = f"{guess}={value or '...'}" if guess else f"{key}={value or '...'}"
        raise ConfigError(
            f"{arg}: {prog} takes key=value overrides, not --options; did you mean {shown}? (see {prog} --help)"
        )


def check_overrides(
    prog: str, config_name: str, overrides: Sequence[str], also: Sequence[Mapping[str, Any]] = ()
) -> None:
    """Each of ``overrides`` (a command line without Hydra's options) fits the ``config_name``
    config of the tree: its groups, their options, its keys (module docstring). ``also``: other
    configs the command takes keys of (for "did you mean" only)."""
    parsed = [p for p in (parse(o) for o in overrides) if not _is_hydra(p.key)]
    if not parsed:
        return
    groups = tree_groups()
    used = used_groups(config_name)
    group_overrides = [p for p in parsed if p.key in groups]
    for p in group_overrides:
        check_group_option(prog, config_name, p, groups, used)
    chosen = [_first_option(p) for p in group_overrides if p.prefix != "~"]
    try:
        base = compose_plain(config_name, chosen)
    except Exception as e:  # noqa: BLE001 - Hydra raises more than its own exception types here
        message = " ".join(str(e).split()).split(" Config search path:")[0]
        raise ConfigError(f"{' '.join(chosen)}: {message}") from None
    for p in parsed:
        if p.key not in groups:
            check_key(p, base, also)


def check_command(
    prog: str, config_name: str, argv: Sequence[str], own_keys: Sequence[str] = (), train_config: str = "train"
) -> None:
    """A compose-based command (main, study, tune): options, then the overrides of its own
    keys against ``config_name`` and the rest against the training config they go to."""
    own_config = compose_plain(config_name, [])
    train = compose_plain(train_config, [])
    check_flags(prog, argv, lambda: [train, own_config])
    own = [a for a in argv if a.split("=")[0].lstrip("+~").split(".")[0] in own_keys]
    check_overrides(prog, config_name, own, also=[train])
    check_overrides(prog, train_config, [a for a in argv if a not in own], also=[own_config])


# ----------------------------------------------------------------------------- parsing
def parse(text: str) -> Parsed:
    """One override through Hydra's grammar (a line naming it when it does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as e:
        message = " ".join(str(e).split()).split(" See https://")[0]
        raise ConfigError(f"cannot parse the override {text!r}: {message}") from None
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(override.type, "")
    sweep = list(override.sweep_string_iterator()) if override.is_sweep_override() else None
    value = None if override.type == OverrideType.DEL else (sweep[0] if sweep else override.value())
    key = override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
    return Parsed(text, key, prefix, value, sweep)


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_option(p: Parsed) -> str:
    return f"{p.prefix}{p.key}={p.value if p.value is not None else 'null'}"


# ----------------------------------------------------------------------------- the config tree
def free_form_maps(config_name: str) -> dict[str, str]:
    """The free-form maps of ``config_name`` (:data:`FREE_FORM`) and how to add an entry."""
    config = compose_plain(config_name, [])
    out = {}
    for prefix, hint in FREE_FORM.items():
        node: Any = config
        for part in prefix.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            out[prefix] = hint
    return out


def tree_groups() -> dict[str, list[str]]:
    from .cli import config_groups

    return config_groups()


@functools.cache
def used_groups(config_name: str) -> list[str]:
    """The groups of the tree that ``config_name``'s defaults list selects (Hydra's own aside)."""
    cfg = _compose(config_name, [], hydra=True)
    return sorted(g for g in cfg.hydra.runtime.choices if not _is_hydra(g))


def compose_plain(config_name: str, overrides: Sequence[str]) -> dict:
    """The composed config as a plain dict, unresolved (interpolations and ``???`` as text);
    composed once per process (read it, do not change it)."""
    return _compose_plain(config_name, tuple(overrides))


@functools.lru_cache(maxsize=64)
def _compose_plain(config_name: str, overrides: tuple[str, ...]) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_compose(config_name, list(overrides)), resolve=False)


def _compose(config_name: str, overrides: list[str], hydra: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .hydra_utils import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


def key_paths(config: Any, prefix: str = "") -> list[str]:
    """Every key of a plain config, dotted, sections included (lists are leaves)."""
    out: list[str] = []
    if isinstance(config, Mapping):
        for k, v in config.items():
            path = f"{prefix}{k}"
            out.append(path)
            out += key_paths(v, f"{path}.")
    return out


# ----------------------------------------------------------------------------- groups
def check_group_option(
    prog: str, config_name: str, p: Parsed, groups: Mapping[str, list[str]], used: Sequence[str]
) -> None:
    """``p`` picks an option of a group ``config_name`` uses (``used``), one the tree has."""
    if p.key not in used:
        guess = _closest(p.key, list(compose_plain(config_name, [])))  # a key of the config, e.g. models for model
        hint = f"; did you mean {guess}?" if guess else ""
        if guess in FREE_FORM:
            hint += f" ({FREE_FORM[guess]})"
        raise ConfigError(f"{p.text}: {prog} has no {p.key} group (its groups: {', '.join(used) or 'none'}){hint}")
    if p.prefix == "~":
        return
    options = groups[p.key]
    for option in p.sweep or [p.value]:
        if option is None or str(option) == "null":
            continue
        if str(option) not in options:
            guess = _closest(str(option), options)
            hint = f"did you mean {p.key}={guess}? " if guess else ""
            raise ConfigError(
                f"{p.key}={option}: no such {p.key} (conf/{p.key}/{option}.yaml); {hint}options: {', '.join(options)}"
            )


# ----------------------------------------------------------------------------- keys
def check_key(p: Parsed, config: Mapping[str, Any], also: Sequence[Mapping[str, Any]] = ()) -> None:
    """``p`` names a key ``config`` holds, or one it may add (module docstring)."""
    parts = p.key.split(".")
    node: Any = config
    depth = 0
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node, depth = node[part], depth + 1
            continue
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node, depth = node[int(part)], depth + 1
            continue
        break
    if depth == len(parts):  # the key exists
        if p.prefix == "+":
            raise ConfigError(f"{p.text}: {p.key} is already in the config; drop the + ({p.text[1:]})")
        return
    found = ".".join(parts[:depth])
    if depth and node is None:  # a section left empty (null): what it may hold is not written down
        return
    if depth and not isinstance(node, (Mapping, list)):
        raise ConfigError(f"{p.key}: {found} is a value ({node!r}), not a section with keys")
    addable = _addable(parts, depth, config)
    if addable in ("free", "named") or (addable == "checked" and p.prefix in ("+", "++")):
        if p.prefix in ("+", "++"):
            return
        if p.prefix == "~":
            raise ConfigError(f"{p.text}: {p.key} is not in the config, nothing to delete")
        raise ConfigError(f"{p.key}: not in the config yet; add it with +{p.text}")
    names = addable if isinstance(addable, list) else []
    candidates = key_paths(config) + [f"{found}.{name}" for name in names] + [q for c in also for q in key_paths(c)]
    guess = _closest_key(p.key, found, candidates)
    hint = f"; did you mean {guess}?" if guess else ""
    raise ConfigError(f"{p.key}: no such key{hint}")


def _addable(parts: list[str], depth: int, config: Mapping[str, Any]) -> str | list[str]:
    """How the missing key ``parts`` may be added (with ``+``): "free" (under a free-form map),
    "checked" (under a section the library checks), "named" (an optional key, or an argument
    of the section's ``_target_``); else the names that could be added under the deepest
    existing section (for "did you mean")."""
    for kind, prefixes in (("free", FREE_FORM), ("checked", CHECKED)):
        for prefix in prefixes:
            wanted = prefix.split(".")
            if parts[: len(wanted)] == wanted and len(parts) > len(wanted) and _holds(config, prefix):
                entry = _node(config, parts[: len(wanted) + 1]) if depth > len(wanted) else None
                if not (
                    isinstance(entry, Mapping) and "_target_" in entry
                ):  # an entry built from its _target_: its arguments
                    return kind
    section = parts[:depth]
    names = _optional_names(section)
    node = _node(config, section)
    if isinstance(node, Mapping) and isinstance(node.get("_target_"), str):
        accepted = target_arguments(node["_target_"])
        if accepted is None:
            return "named"  # it takes **kwargs: left to it
        names = names + accepted
    if depth == len(parts) - 1 and parts[depth] in names:
        return "named"
    return names


def _node(config: Mapping[str, Any], parts: Sequence[str]) -> Any:
    node: Any = config
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _holds(config: Mapping[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _optional_names(section: list[str]) -> list[str]:
    names: list[str] = []
    for pattern, keys in OPTIONAL_KEYS.items():
        wanted = pattern.split(".")
        if len(wanted) == len(section) and all(w in ("*", s) for w, s in zip(wanted, section)):
            names += keys
    return names


def target_arguments(target: str) -> list[str] | None:
    """The keyword arguments of the class or function ``target`` names (None: it takes
    ``**kwargs``, or it cannot be imported here; then any key is left to it)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        # a class that hands **kwargs on to its base (a subclass adding one argument) takes the
        # base's arguments too: follow the classes in method resolution order
        functions = (
            [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
        )
        names: list[str] = []
        for function in functions:
            parameters = inspect.signature(function).parameters.values()
            names += [
                p.name
                for p in parameters
                if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ]
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
                return [n for n in dict.fromkeys(names) if n != "self"]
    except Exception:  # noqa: BLE001 - an import that fails is reported when the object is built
        return None
    return None  # **kwargs all the way down: any key is left to the object


# ----------------------------------------------------------------------------- did you mean
def _closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    found = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=1, cutoff=cutoff)
    return found[0] if found else None


def _by_last_part(word: str, paths: Sequence[str]) -> str | None:
    """The path whose last part is ``word`` (or closest to it), shortest first."""
    exact = sorted((p for p in paths if p.split(".")[-1] == word), key=len)
    if exact:
        return exact[0]
    last = {p.split(".")[-1]: p for p in sorted(paths, key=len, reverse=True)}
    guess = _closest(word, last, cutoff=0.8)
    return last[guess] if guess else None


def _closest_key(key: str, found: str, candidates: Sequence[str]) -> str | None:
    """The key most likely meant: a close key of the same section, else one whose last part
    matches, else the closest anywhere."""
    candidates = list(dict.fromkeys(candidates))
    if found:
        siblings = [c for c in candidates if c.startswith(f"{found}.")]
        guess = _closest(key, siblings)
        if guess:
            return guess
    return _by_last_part(key.split(".")[-1], candidates) or _closest(key, candidates)


def strip_search_path(message: str) -> str:
    """Hydra's errors end with its config search path: noise for the user."""
    return message.split("Config search path:")[0].rstrip()


__all__ = [
    "CHECKED",
    "FREE_FORM",
    "OPEN",
    "OPTIONAL_KEYS",
    "check_command",
    "check_flags",
    "check_overrides",
    "key_paths",
    "parse",
    "strip_search_path",
]

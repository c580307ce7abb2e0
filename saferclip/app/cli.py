"""What every console script shares: one exit-code convention, one-line user errors, help.

* exit 0: done; exit 2: the user can fix the input (a bad override, bad data, a bad file, a
  folder that would be overwritten) — one line on stderr (and in the run's log) naming
  what and where, no traceback; exit 1: anything else, a bug — with its traceback.
* :func:`hydra_command` turns a Hydra task function into a console script: Hydra's own
  errors before the task starts (a command line it cannot parse or compose) are usage
  errors too, and ``--help`` shows the usage, the config groups and where the docs are.
* :func:`command` does the same for the argparse and compose-based scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import SaferclipError

log = logging.getLogger("saferclip")

USAGE_EXIT_CODE = 2
README_POINTER = "docs: README.md (commands, recipes) and docs/METHOD.md (the method, metrics, data formats)"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a console script reports in one line with exit code 2. (Hydra's and
    OmegaConf's only when loaded: the argparse commands start without them.)"""
    config_errors: tuple[type[BaseException], ...] = ()
    if "omegaconf" in sys.modules:
        from omegaconf.errors import OmegaConfBaseException

        config_errors += (OmegaConfBaseException,)
    if "hydra" in sys.modules:
        from hydra.errors import HydraException

        config_errors += (HydraException,)
    return (
        SaferclipError,  # DataFormatError, CheckpointError, ConfigError, NeighbourError, ...
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        *config_errors,
    )


def one_line(error: BaseException) -> str:
    """The error's message on one line (without Hydra's config search path, noise to a user)."""
    message = " ".join(str(error).split())
    return message.split(" Config search path:")[0] or type(error).__name__


def report_user_error(prog: str, error: BaseException, to_log: bool = True) -> None:
    """One line on stderr (and, with ``to_log``, in the run's log), no traceback."""
    message = one_line(error)
    if to_log:
        log.error("%s: %s", type(error).__name__, message)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


@contextmanager
def exit_on_user_error(prog: str, to_log: bool = True) -> Iterator[None]:
    """Turn a user error raised in the body into one line on stderr and ``SystemExit(2)``."""
    try:
        yield
    except user_errors() as e:
        report_user_error(prog, e, to_log)
        raise SystemExit(USAGE_EXIT_CODE) from None


def prefer_fast_openblas() -> None:
    """Pick OpenBLAS's AVX-512 kernels for FAISS on CPUs its bundled OpenBLAS does not know.

    faiss-cpu wheels bundle OpenBLAS 0.3.15, which predates recent Xeons (Sapphire Rapids and
    later, often reported in VMs as a plain "Intel Xeon Processor") and falls back to a
    generic sgemm kernel: exact search runs 1.2-3x slower than with ``OPENBLAS_CORETYPE=SkylakeX``
    (scripts/bench_neighbours.py). The variable is read when that library loads, so the
    commands set it at start, before FAISS is imported; only on Linux CPUs with AVX-512F, and
    never over a value the user chose. The library itself never changes the environment.
    """
    if "OPENBLAS_CORETYPE" in os.environ or "faiss" in sys.modules:
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return
    if " avx512f" in flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"


def command(prog: str, body: Callable[[], Any]) -> int:
    """Run a console script's ``body`` under the exit-code convention (module docstring) and
    return its exit code (a console script's ``main`` returns it; the entry point exits with
    it). These scripts keep no log file: a user error is the one line on stderr."""
    prefer_fast_openblas()
    try:
        with exit_on_user_error(prog, to_log=False):
            code = body()
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 1
    return code if isinstance(code, int) else 0


def hydra_command(prog: str, config_name: str, task: Callable[[Any], Any], summary: str = "") -> Callable[[], None]:
    """A console script running ``task(cfg)`` on the ``config_name`` config of the tree;
    ``summary`` (one line) heads its ``--help``."""
    import hydra

    from .hydra_utils import CONF_DIR, setup_logging

    started = False

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def _task(cfg):
        nonlocal started
        started = True
        setup_logging()
        with exit_on_user_error(prog):
            return task(cfg)

    def main() -> None:
        if wants_help(sys.argv[1:]):
            print(hydra_help(prog, summary, config_name))
            return
        prefer_fast_openblas()
        check_command_line(prog, config_name, sys.argv[1:])
        try:
            _task()
        except SystemExit as e:
            # Hydra reports a command line it cannot parse or compose (method=nope, a typo in
            # a key) on stderr and exits 1 before the task starts: a usage error too
            if e.code == 1 and not started:
                sys.exit(USAGE_EXIT_CODE)
            raise

    main.__doc__ = f"{prog}: the console script (Hydra app over the {config_name!r} config)."
    return main


def check_command_line(prog: str, config_name: str, argv: list[str]) -> None:
    """Check a command line before Hydra runs it (:mod:`saferclip.app.overrides`: every key,
    group and option against the config; no argparse-style options), then compose it, so that
    an override Hydra cannot parse or apply is one line and exit code 2, as every other user
    error, instead of Hydra's report. Hydra's own options (``--cfg``, ``--info``, ...) leave
    the rest to Hydra; a sweep (``-m``) has its keys checked and its folder created."""
    from .overrides import HYDRA_FLAGS, check_flags, check_overrides, compose_plain

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    with exit_on_user_error(prog, to_log=False):
        check_flags(prog, argv, lambda: [compose_plain(config_name, [])])
        if any(a in ("-m", "--multirun") for a in argv):
            check_overrides(prog, config_name, overrides)
            check_sweep_dir(prog, config_name, argv)
            return
        if any(a.split("=")[0] in HYDRA_FLAGS for a in argv if a.startswith("-")):
            return
        overrides = [a for a in overrides if not a.lstrip("+~").startswith("hydra.")]
        check_override_syntax(overrides)
        check_overrides(prog, config_name, overrides)
        from hydra import compose, initialize_config_dir

        from .hydra_utils import CONF_DIR

        run_dir = [a for a in argv if a.startswith("hydra.run.dir=")][-1:]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            try:  # with where Hydra will put the run folder (its own override included)
                cfg = compose(config_name=config_name, overrides=overrides + run_dir, return_hydra_config=True)
            except Exception:  # noqa: BLE001 - again without it: the user's overrides' own error
                compose(config_name=config_name, overrides=overrides)
                cfg = None
        check_writable_folder(_run_dir(cfg), "the run folder (hydra.run.dir)")


def check_sweep_dir(prog: str, config_name: str, argv: list[str]) -> None:
    """The sweep folder of ``-m`` (from the overrides that place it; sweeps of other keys are
    not composed) can be created, else one line and exit 2 before Hydra's traceback."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .hydra_utils import CONF_DIR

    placing = [a for a in argv if a.startswith(("paths.", "hydra.sweep.dir=", "task_name=")) and "," not in a]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=placing, return_hydra_config=True)
        folder = OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_missing=True)
    except Exception:  # noqa: BLE001 - Hydra reports its own overrides itself
        return
    with exit_on_user_error(prog, to_log=False):
        check_writable_folder(folder, "the sweep folder (hydra.sweep.dir)")


def _run_dir(cfg: Any) -> str | None:
    """Where Hydra will create the run folder, or None when it cannot be known before it runs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, "hydra.run.dir", throw_on_missing=True)
    except OmegaConfBaseException:
        return None


def check_writable_folder(folder: str | os.PathLike | None, what: str) -> None:
    """A folder that will be created or written: a file in the way, or a parent that cannot be
    written, is a one-line error naming the path (before Hydra fails on it with a traceback)."""
    from pathlib import Path

    from ..errors import ConfigError

    if folder is None:
        return
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link in the way
            raise ConfigError(f"cannot create {what} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create {what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what} {path}: {probe} is not writable")


def check_override_syntax(overrides: list[str]) -> None:
    """Each override parses (Hydra's own error does not say which one failed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from ..errors import ConfigError

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException as e:  # parse_override raises the base class
            raise ConfigError(f"cannot parse the override {override!r}: {one_line(e).split(' See https://')[0]}") from None


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def config_groups() -> dict[str, list[str]]:
    """The config groups of the tree and their options (file names without ``.yaml``)."""
    from pathlib import Path

    from .hydra_utils import CONF_DIR

    return {
        p.name: sorted(f.stem for f in p.glob("*.yaml"))
        for p in sorted(Path(CONF_DIR).iterdir())
        if p.is_dir() and not p.name.startswith(("_", "."))
    }


def hydra_help(prog: str, summary: str, config_name: str) -> str:
    """``--help`` of a Hydra command: usage, config groups with their options, the docs."""
    lines = [f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...] [-m for a sweep]", ""]
    if summary:
        lines += [summary, ""]
    from .overrides import free_form_maps, used_groups

    groups = config_groups()
    lines += [f"Config: conf/{config_name}.yaml (see it with --cfg job). Groups (GROUP=OPTION):"]
    lines += [f"  {group:<14} {', '.join(groups[group])}" for group in used_groups(config_name) if group in groups]
    maps = free_form_maps(config_name)
    if maps:
        lines += ["", "Entries of your own (+ adds a key; any other key is set without it):"]
        lines += [f"  {prefix:<14} {hint}" for prefix, hint in maps.items()]
    lines += ["", "Hydra's own options: --cfg job, --info, --hydra-help.", README_POINTER]
    return "\n".join(lines)


def compose_help(prog: str, summary: str, config_name: str, keys: dict[str, str], flags: dict[str, str] | None = None) -> str:
    """``--help`` of a script that composes the config tree itself (main job, study)."""
    from .overrides import used_groups

    groups = used_groups("train")  # the training config's: where the other overrides go
    usage = f"usage: {prog} {' '.join(f'[{f}]' for f in flags or {})} [KEY=VALUE ...]".replace("  ", " ")
    lines = [usage, "", summary, ""]
    if flags:
        lines += ["Options:"] + [f"  {k:<16} {v}" for k, v in flags.items()] + [""]
    lines += [f"Its own keys (conf/{config_name}.yaml):"]
    lines += [f"  {k:<16} {v}" for k, v in keys.items()]
    lines += [
        "",
        "Any other KEY=VALUE goes to every training run (the saferclip-train config tree),",
        f"e.g. trainer.max_epochs=4 method.neighbours.k=5 (key=value, not --options). Its groups: {', '.join(groups)}.",
        "",
        README_POINTER,
    ]
    return "\n".join(lines)

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import SaferclipError

log = logging.getLogger("saferclip")

USAGE_EXIT_CODE = 2
README_POINTER = (
    "docs: README.md, docs/USAGE.md (commands, recipes) and docs/METHOD.md (the method, metrics, data formats)"
)


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


def announce_report(command_log: logging.Logger, report: dict, table: str) -> None:
    """Where a command's report went (on the command's logger), then its table on stdout, last,
    so it ends the output."""
    command_log.info(
        "report: %s (open it in a browser); %s, %s, %d plots",
        report["html"],
        report["json"],
        report["markdown"],
        len(report["plots"]),
    )
    print(table, flush=True)


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


def hydra_command(
    prog: str, config_name: str, task: Callable[[Any], Any], doc: str, options: dict[str, str] | None = None
) -> Callable[[], None]:
    """A console script running ``task(cfg)`` on the ``config_name`` config of the tree. Its
    ``--help`` (:func:`hydra_help`) says what the command does and shows its examples (both from
    ``doc``, the command module's docstring) and its main ``options`` (key -> meaning). Hydra is
    imported only when the command runs: ``--help`` imports neither Hydra's app nor torch."""

    def main() -> None:
        if wants_help(sys.argv[1:]):
            print(hydra_help(prog, config_name, doc, options or {}))
            return
        prefer_fast_openblas()
        check_command_line(prog, config_name, sys.argv[1:])
        hydra_main(prog, config_name, task)()

    main.__doc__ = f"{prog}: the console script (Hydra app over the {config_name!r} config)."
    return main


def hydra_main(prog: str, config_name: str, task: Callable[[Any], Any]) -> Callable[[], None]:
    """``task`` under ``@hydra.main`` with the exit-code convention (module docstring)."""
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

    def run() -> None:
        try:
            _task()
        except SystemExit as e:
            # Hydra reports a command line it cannot parse or compose (method=nope, a typo in
            # a key) on stderr and exits 1 before the task starts: a usage error too
            if e.code == 1 and not started:
                sys.exit(USAGE_EXIT_CODE)
            raise

    return run


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
            raise ConfigError(
                f"cannot parse the override {override!r}: {one_line(e).split(' See https://')[0]}"
            ) from None


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def config_groups() -> dict[str, list[str]]:
    """The config groups of the tree and their options (file names without ``.yaml``)."""
    from pathlib import Path

    from .. import locations

    return {
        p.name: sorted(f.stem for f in p.glob("*.yaml"))
        for p in sorted(Path(locations.CONF_DIR).iterdir())
        if p.is_dir() and not p.name.startswith(("_", "."))
    }


# ----------------------------------------------------------------------------- --help
QUIET_HELP = {
    "--quiet": "(or -q) print only the final table; warnings and errors still go to stderr",
}


def doc_summary(doc: str) -> str:
    """What a command does: its module docstring's first paragraph, without the ``prog:`` lead
    and the cross-reference markup, as a sentence wrapped for a terminal."""
    import re
    import textwrap

    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    if paragraph.startswith("saferclip-"):
        paragraph = paragraph.split(": ", 1)[1]
    paragraph = re.sub(r":\w+:`~?([^`]+)`", r"\1", paragraph).replace("``", "")
    return textwrap.fill(paragraph[:1].upper() + paragraph[1:], 100)


def doc_examples(doc: str) -> list[str]:
    """A command's examples: the first indented block of its module docstring, as written."""
    lines = doc.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("    ") and line.strip()), None)
    if start is None:
        return []
    block = []
    for line in lines[start:]:
        if not line.startswith("    ") and line.strip():
            break
        block.append(line[4:].rstrip())
    while block and not block[-1]:
        block.pop()
    return block


def examples_text(doc: str) -> str:
    """The ``Examples:`` section of a command's ``--help`` (also an argparse epilog's start)."""
    return "\n".join(["Examples:", *[f"  {line}" if line else "" for line in doc_examples(doc)]])


def argparse_epilog(doc: str) -> str:
    """An argparse command's epilog: its examples, then where the docs are (use it with
    ``formatter_class=argparse.RawDescriptionHelpFormatter`` so the lines stay as written)."""
    return f"{examples_text(doc)}\n\n{README_POINTER}"


def option_lines(options: dict[str, str], width: int = 22) -> list[str]:
    return [f"  {k:<{width}} {v}" if len(k) < width else f"  {k}\n  {'':<{width}} {v}" for k, v in options.items()]


def hydra_help(prog: str, config_name: str, doc: str, options: dict[str, str]) -> str:
    """``--help`` of a Hydra command: usage, what it does, its main options, examples, the
    config groups it uses (read from the config files, nothing composed) and where the docs are."""
    lines = [f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...] [-m for a sweep]", "", doc_summary(doc), ""]
    if options:
        lines += ["Main options (KEY=VALUE; + adds a key of your own):", *option_lines(options), ""]
    lines += [examples_text(doc), ""]
    groups, used = config_groups(), config_defaults(config_name)
    if used:
        lines += [f"Config: conf/{config_name}.yaml (see it with --cfg job). Groups (GROUP=OPTION):"]
        lines += [f"  {group:<14} {', '.join(groups[group])}" for group in used if group in groups]
        lines += [""]
    lines += ["Hydra's own options: --cfg job, --info, --hydra-help.", README_POINTER]
    return "\n".join(lines)


def config_defaults(config_name: str) -> list[str]:
    """The groups ``conf/<config_name>.yaml``'s defaults list selects, its own and those of the
    configs it extends (read from the YAML files, without composing: ``--help`` stays quick)."""
    from pathlib import Path

    import yaml

    from .. import locations

    groups: list[str] = []
    seen: set[str] = set()
    names = [config_name]
    while names:
        name = names.pop(0)
        if name in seen:
            continue
        seen.add(name)
        path = Path(locations.CONF_DIR) / f"{name}.yaml"
        if not path.is_file():
            continue
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        for entry in defaults:
            if isinstance(entry, str):
                if entry != "_self_":
                    names.append(entry)
                continue
            for key in entry:
                group = str(key).split("@")[0].split(" ")[-1].lstrip("/")
                if "/" not in group and (Path(locations.CONF_DIR) / group).is_dir() and group not in groups:
                    groups.append(group)
    return sorted(groups)


def compose_help(
    prog: str, config_name: str, doc: str, keys: dict[str, str], flags: dict[str, str] | None = None
) -> str:
    """``--help`` of a pipeline command that composes the config tree itself (main, study, tune)."""
    groups = config_defaults("train")  # the training config's: where the other overrides go
    usage = f"usage: {prog} {' '.join(f'[{f}]' for f in flags or {})} [KEY=VALUE ...]".replace("  ", " ")
    lines = [usage, "", doc_summary(doc), ""]
    if flags:
        lines += ["Options:", *option_lines(flags), ""]
    lines += [f"Its own keys (conf/{config_name}.yaml):", *option_lines(keys), ""]
    lines += [examples_text(doc), ""]
    lines += [
        "Any other KEY=VALUE goes to every training run (the saferclip-train config tree),",
        f"e.g. trainer.max_epochs=4 method.neighbours.k=5 (key=value, not --options). Its groups: {', '.join(groups)}.",
        "",
        README_POINTER,
    ]
    return "\n".join(lines)

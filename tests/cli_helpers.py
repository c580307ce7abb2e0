"""A console script run inside the test's own interpreter: the installed entry point's ``main``
(pyproject.toml's ``[project.scripts]``, as the installed script calls it), with its command
line, working folder, environment and standard streams, and what the process would have
exited with.

A fresh interpreter costs 5-20 s on a shared 2-core machine (importing torch, Lightning,
Hydra, open_clip) for a case that then runs for well under a second, so a test that feeds
many inputs to a command runs the command here; each command keeps tests of the installed
script in a subprocess too (tests/test_bad_inputs.py's ``--help`` of every script, and the
cases listed there with ``installed=True``). What a process boundary would reset is reset
around the call: the environment, the working folder, ``sys.argv``, the logging setup,
saferclip's verified-checksum memo; torch runs on one thread as ``OMP_NUM_THREADS=1`` would
make it. An exception escaping ``main`` is printed with its traceback and exit code 1, as the
interpreter would.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path


def entry_point(name: str):
    """The installed console script ``name``'s function (a missing one fails the test)."""
    found = [e for e in entry_points(group="console_scripts") if e.name == name]
    assert found, f"{name} is not an installed console script (pip install -e .)"
    return found[0].load()


def _logging_state() -> dict:
    loggers = [logging.getLogger()] + [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
    ]
    return {id(lg): (lg, lg.level, lg.propagate, lg.disabled, list(lg.handlers), list(lg.filters)) for lg in loggers}


def _restore_logging(before: dict) -> None:
    """The loggers that existed before as they were, the handlers the command added to them
    (Hydra's console and file handlers, a ``basicConfig``) closed and removed. (A logger first
    made during the command, by a module it imported, keeps what that import set up.)"""
    for lg, level, propagate, disabled, handlers, filters in before.values():
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.filters[:] = filters
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def run_in_process(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``name args...`` run in this interpreter, in ``cwd``, with ``env`` added to this
    process's environment (and ``OMP_NUM_THREADS=1``): a CompletedProcess as
    ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
    import torch

    from saferclip import integrity

    main = entry_point(name)
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_logging, saved_threads = _logging_state(), torch.get_num_threads()
    root = logging.getLogger()
    code: int
    try:
        os.environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
        os.chdir(cwd)
        sys.argv = [name, *args]
        torch.set_num_threads(1)
        integrity.forget()  # a new process starts with no file known to be verified
        root.handlers[:] = []  # the test's log capture is not a handler the command would see
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result = main()
                code = result if isinstance(result, int) else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - the interpreter's report of an uncaught exception
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        _restore_logging(saved_logging)
        integrity.forget()
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())

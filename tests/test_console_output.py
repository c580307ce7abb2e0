"""Output fit for a log: progress bars on a terminal only, one line per epoch otherwise, the
final table printed last, ``--quiet`` printing only the table."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from train_helpers import cli_env, compose_train, time_budget

from saferclip import console
from saferclip.evaluation.headline import NOT_APPLICABLE_NOTE

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    "stdout, stderr, shown", [(True, True, True), (False, True, False), (True, False, False), (False, False, False)]
)
def test_progress_bars_only_when_both_streams_are_terminals(monkeypatch, stdout, stderr, shown):
    monkeypatch.delenv("SAFERCLIP_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stdout", Stream(stdout))
    monkeypatch.setattr(sys, "stderr", Stream(stderr))
    assert console.interactive() is shown
    assert console.show_progress(None) is shown and console.show_progress(True) is shown
    assert console.show_progress(False) is False
    monkeypatch.setenv("SAFERCLIP_PROGRESS", "1")
    assert console.show_progress(None) is True and console.show_progress(False) is False


def test_a_trainer_writing_to_a_file_logs_one_line_per_epoch(tmp_path, toy_world, monkeypatch, caplog):
    import logging

    from saferclip.app.engine.callbacks import EpochLine
    from saferclip.app.engine.fit import build_trainer, train

    cfg = compose_train(
        tmp_path,
        toy_world,
        "trainer.enable_progress_bar=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "export=false",
    )
    monkeypatch.setenv("SAFERCLIP_PROGRESS", "1")  # a terminal: Lightning's bar, no epoch lines
    trainer, callbacks = build_trainer(cfg)
    assert trainer.progress_bar_callback is not None and not any(isinstance(c, EpochLine) for c in callbacks)
    monkeypatch.setenv("SAFERCLIP_PROGRESS", "0")  # a file
    trainer, callbacks = build_trainer(cfg)
    assert trainer.progress_bar_callback is None and any(isinstance(c, EpochLine) for c in callbacks)
    with caplog.at_level(logging.INFO, logger="saferclip.train"):
        train(cfg)
    # the epoch lines only (another test may have let the data module's INFO lines through)
    lines = [r.getMessage() for r in caplog.records if r.name == "saferclip.train" and "epoch " in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("run: epoch 1/2: step 2,") and "val unsafe (a)" in lines[1]


TINY_MAIN = [
    "model=micro",
    "data.toy_size=small",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "logger=csv",
]


@pytest.mark.slow
def test_main_job_into_a_file_ends_with_the_table_and_quiet_prints_only_it(tmp_path, toy_world):
    args = [
        f"out_dir={tmp_path / 'main'}",
        f"runs_dir={tmp_path / 'runs'}",
        f"paths.toy_dir={toy_world}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *TINY_MAIN,
    ]
    env = cli_env(SAFERCLIP_HOME=str(tmp_path / "home"))
    env.pop("SAFERCLIP_PROGRESS", None)
    command = [sys.executable, "-m", "saferclip.app.commands.main_job"]
    left = time_budget()  # both runs share the test's time
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=left())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stdout + proc.stderr  # no progress-bar frames
    assert len(out) < 100 and len((proc.stdout + proc.stderr).splitlines()) < 100
    table = [i for i, line in enumerate(out) if line.startswith("| metric |")]
    rows = [line for line in out[table[0] :] if line.startswith("|")] if table else []
    footnote = out[table[0] + len(rows) :] if table else []  # HySAC's "n/a†" explained under the table
    assert (
        table and all(line.startswith("|") for line in out[table[0] : table[0] + len(rows)]) and out[table[0] - 1] == ""
    )
    assert footnote in ([], ["", NOT_APPLICABLE_NOTE])
    assert (tmp_path / "main" / "report" / "report.html").is_file() and str(
        tmp_path / "main" / "report" / "report.html"
    ) in proc.stdout
    assert proc.stderr.count("epoch 1/2") == 3 and proc.stderr.count("epoch 2/2") == 3  # one line per epoch, three runs
    # --quiet: the table only (the runs are reused)
    quiet = subprocess.run([*command, "--quiet", *args], capture_output=True, text=True, env=env, timeout=left())
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.strip().splitlines() == out[table[0] :]
    assert "saferclip.eval" not in quiet.stderr  # no INFO lines

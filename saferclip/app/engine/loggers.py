"""The CSV logger of a run: every epoch's rows, once, across resumes.

Lightning's CSVLogger deletes ``metrics.csv`` when its writer starts, so a resumed run would
keep only the epochs after the resume. :class:`RunCSVLogger` keeps the history of a resumed
run instead: the rows logged before the checkpoint it resumes from (``step`` below the
checkpoint's ``global_step``) stay; the rows of the interrupted, unfinished epoch go, since
the resumed run logs those steps again. A fresh run starts a fresh file, as Lightning's does.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from ...files import write_text_atomic


class _ResumingWriter(ExperimentWriter):
    """An ExperimentWriter that keeps the rows logged before ``keep_below_step``."""

    def __init__(self, log_dir: str, keep_below_step: int | None) -> None:
        self.keep_below_step = keep_below_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.keep_below_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()  # a fresh run: Lightning's own behaviour
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) < self.keep_below_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.metrics_file_path, out.getvalue())
        self.metrics_keys = fields  # the header already written: later rows extend it


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")  # a damaged row: dropped (nan < x is False)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose history survives a resume (module docstring). Set
    :attr:`resume_from_step` (the resumed checkpoint's ``global_step``) before training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from_step: int | None = None

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # every checkpoint is a point a run may resume from: the rows before it must be on
        # disk by then (Lightning otherwise writes every 100 steps and at the end)
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        get_filesystem(self.root_dir).makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumingWriter(log_dir=self.log_dir, keep_below_step=self.resume_from_step)
        return self._experiment

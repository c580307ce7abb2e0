"""Lightning callbacks of the training app."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from ...evaluation.selection import (
    DEFAULT_RANK_BY,
    DEFAULT_TAU,
    MATCHED_METRIC,
    REDIRECTION_KEY,
    SELECTION_METRIC,
    SELECTION_MONITOR,
    UNSAFE_KEY,
    VALIDATION_PREFIX,
    matched_choice,
    metric_of_monitor,
    validation_figures,
)
from ...files import write_json_atomic
from ...model.trained import SELECTION_FILE


class SelectionRecord(Callback):
    """Keeps every epoch's validation metrics and which epoch the checkpoint callback keeps,
    in ``<run>/selection.json`` (rewritten atomically after every epoch):

    ``{"monitor", "mode", "selected": {"epoch", "global_step", "checkpoint", "score",
    "metrics"}, "matched_safety": {"tau", "reached", "epoch", "unsafe", "U2V",
    "selection_score", "note", ...}, "history": [{"epoch", "global_step", "metrics"}, ...]}``

    ``matched_safety`` is the epoch matched safety keeps at ``tau`` and why, in words ("never
    reached τ = 5%; safest: 12.4% unsafe at U→V 31.0 (epoch 3)"); with the default monitor
    (``val/matched_safety``) it is ``selected``'s epoch. Export, the model card, the main job
    and the study read the file to say which epoch was exported and how it scored on the
    validation split. The history travels in the training checkpoint, so a resumed run keeps
    the epochs before the interruption.
    """

    def __init__(self, path: str | Path, tau: float = DEFAULT_TAU, rank_by: str = DEFAULT_RANK_BY):
        self.path = Path(path)
        self.tau = float(tau)
        self.rank_by = str(rank_by)
        self.history: list[dict[str, Any]] = []

    # -- recording
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        metrics = validation_figures(trainer.callback_metrics)
        if not metrics:
            return
        entry = {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step), "metrics": metrics}
        self.history = [h for h in self.history if h["epoch"] != entry["epoch"]] + [entry]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run or not self.history:
            return
        write_json_atomic(
            self.path, selection_summary(trainer.checkpoint_callbacks, self.history, self.tau, self.rank_by)
        )

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def selection_summary(
    checkpoint_callbacks: list, history: list[dict[str, Any]], tau: float = DEFAULT_TAU, rank_by: str = DEFAULT_RANK_BY
) -> dict[str, Any]:
    """What :class:`SelectionRecord` writes: the history plus the kept epoch (the first epoch
    holding the best monitored value, as ``ModelCheckpoint`` keeps the first of equal bests)
    and the epoch matched safety at ``tau`` (ranked by ``rank_by``) keeps, with its note."""
    monitoring = next((cb for cb in checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
    out: dict[str, Any] = {
        "monitor": None,
        "mode": None,
        "selected": None,
        "matched_safety": matched_choice(history, tau, rank_by),
        "history": history,
    }
    if monitoring is None:
        last = history[-1]
        out["selected"] = {**last, "checkpoint": None, "score": None, "why": "no monitored checkpoint: the last epoch"}
        return out
    key = metric_of_monitor(monitoring.monitor)
    out.update(monitor=monitoring.monitor, mode=monitoring.mode)
    scored = [h for h in history if isinstance(h["metrics"].get(key), float) and math.isfinite(h["metrics"][key])]
    if not scored:
        return out
    sign = 1 if monitoring.mode == "max" else -1
    best = max(scored, key=lambda h: (sign * h["metrics"][key], -h["epoch"]))
    out["selected"] = {
        **best,
        "checkpoint": monitoring.best_model_path or None,
        "score": best["metrics"][key],
    }
    return out


class WarmupEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` that cannot stop a run within its first ``warmup_epochs``
    epochs: they are compared (the best value so far is kept) but not counted against
    ``patience``, which starts counting after them. (``trainer.min_epochs`` is not enough: a stop
    signal raised before it stays raised, and the run then ends as soon as the minimum is
    reached, even while its monitor is improving.) Safety emerges over epochs (docs/METHOD.md,
    "The search's warm-up"); a run must not be ended before it can."""

    def __init__(self, *args: Any, warmup_epochs: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"callbacks.early_stopping.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs

    def _check(self, trainer: L.Trainer, check: Any) -> None:
        if trainer.current_epoch + 1 > self.warmup_epochs:
            check()
            return
        stop_before = trainer.should_stop
        check()  # keeps the best value so far...
        trainer.should_stop = stop_before  # ... but never stops, and the epoch does not count
        self.wait_count, self.stopped_epoch = 0, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, lambda: super(WarmupEarlyStopping, self).on_validation_end(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, lambda: super(WarmupEarlyStopping, self).on_train_epoch_end(trainer, pl_module))


EPOCH_LINE_METRICS = (
    (VALIDATION_PREFIX + UNSAFE_KEY, "val unsafe (a)", True),
    (VALIDATION_PREFIX + REDIRECTION_KEY, "U→V R@1", True),
    (VALIDATION_PREFIX + "S2V_R@1", "S→V R@1", True),
    (VALIDATION_PREFIX + "nsfw_caps_S2V_R@1", "NSFW-Caps S→V R@1", True),
    (SELECTION_MONITOR, "selection", False),
)


class EpochLine(Callback):
    """One log line per epoch (logger ``saferclip.train``, INFO) where no progress bar is
    shown (output to a file, ``saferclip.console``): the run, the epoch, its steps and
    seconds, the training loss and the validation figures."""

    def __init__(self, name: str = ""):
        self.name = name
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        parts = []
        loss = next((metrics[k] for k in ("train/loss_epoch", "train/loss") if k in metrics), None)
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        for key, label, percent in EPOCH_LINE_METRICS:
            if key in metrics:
                value = float(metrics[key])
                parts.append(f"{label} {100 * value:.1f}%" if percent else f"{label} {value:.3f}")
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        logging.getLogger("saferclip.train").info(
            "%sepoch %d/%s: step %d, %.0f s%s",
            f"{self.name}: " if self.name else "",
            trainer.current_epoch + 1,
            total,
            trainer.global_step,
            time.perf_counter() - self.started,
            f"; {', '.join(parts)}" if parts else "",
        )


__all__ = [
    "MATCHED_METRIC",
    "SELECTION_FILE",
    "SELECTION_METRIC",
    "EpochLine",
    "SelectionRecord",
    "WarmupEarlyStopping",
    "selection_summary",
]

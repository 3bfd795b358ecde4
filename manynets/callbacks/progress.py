"""Progress as plain lines, for output that no terminal shows (SLURM, nohup, CI logs, ``> log.txt``).

A rich or tqdm bar redraws one line; written to a file it shows nothing until its last frame.
:class:`PlainProgress` is a Lightning ``ProgressBar`` that prints whole lines instead: during training
every ``every`` fraction of an epoch (and at least every ``interval`` seconds)::

    epoch 1/8, step 12/25 (48 %), train/loss 1.234, 412 images/s, 0:00:03 elapsed, 0:00:03 left in epoch

after each validation of ``fit`` the validation metrics, and the same step lines for standalone
``validate``, ``test`` and ``predict``. The manynets CLI uses it instead of Lightning's RichProgressBar
whenever standard output is not a terminal. Lines are printed by rank 0 only.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

from manynets.analysis.progress import duration
from manynets.errors import check_arg


def _value(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class PlainProgress(ProgressBar):
    """Lightning progress bar that prints plain lines (see the module docstring).

    Args:
        every: print a line each time another fraction ``every`` of the epoch's (or evaluation's)
            batches is done (0.1: at 10 %, 20 %, ...).
        interval: also print when this many seconds passed since the last line (slow steps).
    """

    def __init__(self, every: float = 0.1, interval: float = 60.0) -> None:
        super().__init__()
        name = "trainer.callbacks[PlainProgress].init_args"
        check_arg(0.0 < every <= 1.0, f"{name}.every", every, "a fraction in (0, 1]", "0.1 prints every 10 %.")
        check_arg(interval > 0, f"{name}.interval", interval, "> 0 seconds")
        self.every, self.interval = every, interval
        self._enabled = True
        self._start = self._last = time.monotonic()
        self._next = every
        self._images = 0

    # -- ProgressBar interface -----------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **{"flush": True, **kwargs})

    # -- one pass (an epoch, an evaluation) --------------------------------------------
    def _begin(self) -> None:
        self._start = self._last = time.monotonic()
        self._next, self._images = self.every, 0

    def _begin_evaluation(self) -> None:
        self.reset_dataloader_idx_tracker()
        self._begin()

    def _due(self, done: int, total: float) -> bool:
        """Whether a line is due after ``done`` of ``total`` batches (``total`` may be inf: unknown)."""
        now = time.monotonic()
        due = now - self._last >= self.interval
        if math.isfinite(total) and total > 0:
            fraction = done / total
            if fraction >= self._next - 1e-9 or done >= total:
                due = True
                while self._next <= fraction + 1e-9:
                    self._next += self.every
        if due:
            self._last = now
        return due

    def _timing(self, done: int, total: float, what: str) -> str:
        elapsed = time.monotonic() - self._start
        text = f"{duration(elapsed)} elapsed"
        if math.isfinite(total) and done:
            text += f", {duration(elapsed / done * (total - done))} left in {what}"
        return text

    @staticmethod
    def _count(done: int, total: float) -> str:
        if math.isfinite(total) and total > 0:
            return f"{done}/{int(total)} ({100.0 * done / total:.0f} %)"
        return str(done)

    def _add_images(self, trainer: pl.Trainer, batch: Any) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        self._images += (len(images) if hasattr(images, "__len__") else 0) * trainer.world_size

    def _rate(self) -> str:
        elapsed = time.monotonic() - self._start
        return f"{self._images / elapsed:.0f} images/s" if elapsed > 0 and self._images else ""

    # -- training ------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._add_images(trainer, batch)
        done, total = batch_idx + 1, self.total_train_batches
        if not self._enabled or not self._due(done, total):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [self._epoch(trainer), f"step {self._count(done, total)}",
                 *(f"{k} {_value(v)}" for k, v in metrics.items()), self._rate(),
                 self._timing(done, total, "epoch")]  # fmt: skip
        self.print(", ".join(p for p in parts if p))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.monotonic() - getattr(self, "_fit_start", time.monotonic())
        self.print(f"training ended after {trainer.current_epoch} epochs, {trainer.global_step} steps, "
                   f"{duration(elapsed)}")  # fmt: skip

    @staticmethod
    def _epoch(trainer: pl.Trainer) -> str:
        last = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
        return f"epoch {trainer.current_epoch + 1}/{last}"

    # -- evaluation ----------------------------------------------------------------------
    def _in_fit(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == "fit"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._in_fit(trainer):
            self._begin_evaluation()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self._in_fit(trainer):
            self._eval_batch_start(dataloader_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self._in_fit(trainer):  # within fit: one summary line at the end (on_validation_end)
            self._eval_line(trainer, batch, batch_idx, dataloader_idx, "validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._in_fit(trainer):
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and (k.count("/") == 1 or k.endswith("/acc"))}  # fmt: skip
        values = ", ".join(f"{k} {_value(v)}" for k, v in sorted(metrics.items()))
        self.print(f"{self._epoch(trainer)} validation (step {trainer.global_step}): {values or 'no metrics'}")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_evaluation()

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:  # fmt: skip
        self._eval_batch_start(dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._eval_line(trainer, batch, batch_idx, dataloader_idx, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_evaluation()

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:  # fmt: skip
        self._eval_batch_start(dataloader_idx)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._eval_line(trainer, batch, batch_idx, dataloader_idx, "predict")

    def _eval_batch_start(self, dataloader_idx: int) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # a new evaluation set starts: time it from here
            self._begin()

    def _eval_line(self, trainer: pl.Trainer, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        total = {"validation": lambda: self.total_val_batches_current_dataloader,
                 "test": lambda: self.total_test_batches_current_dataloader,
                 "predict": lambda: self.total_predict_batches_current_dataloader}[stage]()  # fmt: skip
        self._add_images(trainer, batch)
        done = batch_idx + 1
        if not self._enabled or not self._due(done, total):
            return
        loaders = {"validation": trainer.num_val_batches, "test": trainer.num_test_batches,
                   "predict": trainer.num_predict_batches}[stage]  # fmt: skip
        name = f"{stage} set {dataloader_idx + 1}/{len(loaders)}" if len(loaders) > 1 else stage
        parts = [f"{name}: batch {self._count(done, total)}", self._rate(), self._timing(done, total, stage)]
        self.print(", ".join(p for p in parts if p))

"""TensorBoard's ``hp_metric`` gets the run's monitored metric instead of Lightning's placeholder -1.

TensorBoard's HParams tab shows each run's hyper-parameters beside the scalar ``hp_metric``; Lightning's
TensorBoardLogger writes -1 there and leaves it to the user. :class:`MonitoredHpMetric` logs the
checkpoint's monitored metric (``val/acc`` in the manynets CLI) as ``hp_metric`` after every validation
of ``fit`` (TensorBoard loggers only; the other loggers have the metric under its own name).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger


class MonitoredHpMetric(Callback):
    """Log ``monitor`` as TensorBoard's ``hp_metric`` after each validation.

    Args:
        monitor: the metric (default: the checkpoint callback's ``monitor``, e.g. ``val/acc``).
    """

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor = self.monitor or getattr(trainer.checkpoint_callback, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        if value is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_metrics({"hp_metric": float(value)}, step=trainer.global_step)

"""A reliability diagram of every test run (Guo et al., ICML 2017; binning of the logged ``test/ece``).

:class:`ReliabilityDiagram` bins the default prediction of the first test set (the logits that
:meth:`~manynets.lightning_modules.ClassifierModule.test_step` returns: an ensemble's mean member
logits) into 15 equal-width confidence bins, sums the bins over DDP ranks and writes, on rank 0,
``reliability.csv`` (bin_lower, bin_upper, confidence, accuracy, count, fraction) and
``reliability.png`` with the ECE in the title into ``dirpath`` (default: the trainer's ``log_dir``).
The math is :mod:`manynets.analysis.reliability`; its ECE equals ``test/ece``.

    manynets test --config X --ckpt_path Y --trainer.callbacks+=manynets.callbacks.ReliabilityDiagram
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from manynets.analysis import output_dir, run_name
from manynets.analysis.reliability import NUM_BINS, ReliabilityBins, write_reliability
from manynets.errors import check_arg


class ReliabilityDiagram(pl.Callback):
    """Reliability diagram and table of the first test set's default prediction (see module doc).

    Args:
        num_bins: equal-width confidence bins on [0, 1] (15, as the logged ECE).
        dirpath: folder of ``reliability.csv`` / ``reliability.png`` (default: the trainer's ``log_dir``).
        plot: draw ``reliability.png`` besides the CSV.
    """

    def __init__(self, num_bins: int = NUM_BINS, dirpath: str | None = None, plot: bool = True) -> None:
        super().__init__()
        check_arg(num_bins >= 1, "trainer.callbacks[ReliabilityDiagram].init_args.num_bins", num_bins,
                  ">= 1 equal-width bins", "15 matches the logged ECE.")  # fmt: skip
        self.num_bins, self.dirpath, self.plot = num_bins, dirpath, plot
        self.bins: ReliabilityBins | None = None
        self.rows: list[dict[str, float]] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bins = ReliabilityBins(self.num_bins, pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0 and isinstance(outputs, torch.Tensor) and outputs.dim() == 2:
            self.bins.update(outputs, batch[1])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bins is None:
            return
        self.bins.sums = trainer.strategy.reduce(self.bins.sums, reduce_op="sum")  # collective: every rank
        self.rows = self.bins.rows()
        if trainer.is_global_zero and any(r["count"] for r in self.rows):
            write_reliability(self.rows, output_dir(trainer, self.dirpath), trainer, run_name(trainer), plot=self.plot)

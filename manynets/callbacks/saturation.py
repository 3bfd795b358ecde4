"""Layer saturation tracked online during training (delve / PHD-LAB, spec pinet_saturation §2.1-2.3).

:class:`Saturation` taps the outputs of the Conv2d and Linear layers of any model (raw outputs: pre-BN,
pre-activation, as delve does; the layers of the backbone and of the method's own parts, e.g. MixMo's
member stems and heads, see :mod:`manynets.analysis.selection`) and, per mode (``train`` batches,
``eval`` = validation batches, ``test``), accumulates a float64 covariance over the **whole epoch**
(delve >= 0.1.45 only keeps the last batch, spec §2.3; this is PHD-LAB's intended behaviour with the
0.1.41 it pins). At the end of every training epoch the sums are all-reduced across DDP ranks, the
intrinsic dimension and the saturation (spec §2.2) are computed (:mod:`manynets.analysis.saturation`) and

- logged as ``saturation/{mode}/{layer}`` and ``idim/{mode}/{layer}``,
- written to ``saturation.csv`` (one row per epoch; saturation a fraction, units in the header; on
  resume the rows of the re-run epochs are replaced, so the file never holds duplicates),
- drawn as per-layer bars of the epoch, ``saturation_epoch{k:03d}.png``, and as one epoch x layer
  heatmap of all epochs so far, ``saturation_heatmap.png``, redrawn every epoch (both also sent to
  TensorBoard / any logger with ``log_image``); a test or validate run draws
  ``saturation_test_epoch{k:03d}.png`` / ``saturation_validate_epoch{k:03d}.png``.

Layer names are the module paths inside the backbone joined by ``-`` (delve's naming, e.g.
``body-0-conv1``, ``head``); figures label them with the dotted path
(:func:`~manynets.analysis.outputs.layer_labels`). Overhead: one ``addmm`` per tracked layer and recorded batch on the
device, at the batch end, no host synchronisation per step, in float32 on mean-shifted outputs by default
(half the cost of float64 products, the same saturation; see
:class:`~manynets.layers.covariance.StreamingCovariance`; ``matmul_dtype: float64`` is delve's);
``every_n_batches`` records every k-th batch.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch

from manynets.analysis import (
    SaturationTracker,
    check_layer_options,
    output_dir,
    plot_saturation,
    plot_saturation_heatmap,
    read_csv,
    run_name,
    save_figure,
    select_layers,
    titled,
    write_csv,
)
from manynets.errors import check_arg
from manynets.layers.covariance import ConvMethod, Count

Mode = Literal["train", "eval", "test"]
UNITS = {"saturation": "fraction", "idim": "dimensions"}


class Saturation(pl.Callback):
    """Per-layer saturation and intrinsic dimension over every epoch (spec §2.1-2.3).

    Args:
        layers: regular expression on layer names (``-``-joined module paths in the backbone); ``None``: all.
        types: module class names tracked (``Conv2d``, ``Linear``, ``Conv1d``, ``Conv3d``).
        delta: threshold in (0, 1] of the cumulative explained variance (delve ``sat_threshold``; 0.97-0.9995).
        count: ``delve`` (the published rule, ID = #{k : p_k < delta}) or ``textbook`` (min{k : p_k >= delta}).
        conv_method: ``channelwise`` (every position a sample; delve's default), ``mean`` or ``flatten``.
        downsampling: resize conv maps larger than d x d to d x d (nearest) before accumulating.
        every_n_batches: record every k-th batch (delve ``log_interval``).
        modes: which loops are recorded: ``train``, ``eval`` (validation), ``test``.
        matmul_dtype: ``float32`` (default: float32 products of the mean-shifted outputs, summed in float64; the same
            saturation as float64, eigenvalues within 1e-6 of the largest) or ``float64`` products (delve).
        dirpath: folder of the CSV and plots (default: the trainer's ``log_dir``).
        plot: draw the per-layer bars and the epoch x layer heatmap (PNG) each epoch.
    """

    def __init__(
        self,
        layers: str | None = None,
        types: list[str] = ["Conv2d", "Linear"],  # noqa: B006 (jsonargparse needs a plain default)
        delta: float = 0.99,
        count: Count = "delve",
        conv_method: ConvMethod = "channelwise",
        downsampling: int | None = None,
        every_n_batches: int = 1,
        modes: list[Mode] = ["train", "eval"],  # noqa: B006
        matmul_dtype: Literal["float32", "float64"] = "float32",
        dirpath: str | None = None,
        plot: bool = True,
    ) -> None:
        super().__init__()
        c = "trainer.callbacks[Saturation].init_args."
        check_layer_options(c, layers, types)
        check_arg(0 < delta <= 1, c + "delta", delta, "a fraction in (0, 1] of the explained variance",
                  "delta is a fraction: 0.99, not 99.")
        check_arg(downsampling is None or downsampling >= 1, c + "downsampling", downsampling, "null or a side >= 1")
        check_arg(every_n_batches >= 1, c + "every_n_batches", every_n_batches, ">= 1", "1 records every batch.")
        bad = [m for m in modes if m not in ("train", "eval", "test")]
        check_arg(bool(modes) and not bad, c + "modes", list(modes), "a non-empty list out of 'train', 'eval', 'test'")
        self.layers, self.types, self.delta, self.count = layers, list(types), delta, count
        self.conv_method, self.downsampling, self.every_n_batches = conv_method, downsampling, every_n_batches
        self.modes = list(modes)
        self.matmul_dtype = getattr(torch, matmul_dtype)
        self.dirpath, self.plot = dirpath, plot
        self.tracker: SaturationTracker | None = None
        self.rows: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    # -- hooks on the model ---------------------------------------------------------------
    def attach(self, pl_module: torch.nn.Module) -> SaturationTracker:
        """Tap the chosen layers of ``pl_module`` (once; after ``configure_model``, so deferred networks exist)."""
        if self.tracker is None:
            self.tracker = SaturationTracker(select_layers(pl_module, self.layers, self.types), self.delta, self.count,
                                             self.conv_method, self.downsampling, self.matmul_dtype)  # fmt: skip
        return self.tracker

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tracker is not None:
            self.tracker.remove()
            self.tracker = None

    def _start(self, trainer: pl.Trainer, mode: str, batch_idx: int) -> None:
        record = mode in self.modes and not trainer.sanity_checking and batch_idx % self.every_n_batches == 0
        self.tracker.start(mode if record else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "eval", batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "test", batch_idx)

    def _stop(self, *args, **kwargs) -> None:
        self.tracker.flush()
        self.tracker.start(None)

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _stop

    # -- epoch ends ---------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Tap the layers; on resume keep the CSV rows of the finished epochs only (no duplicates, spec §2.11.7)."""
        self.attach(pl_module)
        path = output_dir(trainer, self.dirpath) / "saturation.csv"
        if trainer.current_epoch > 0 and path.is_file() and not self.rows:
            self.rows = [
                {k: float(v) for k, v in row.items() if v != ""}
                for row in read_csv(path)
                if int(float(row["epoch"])) < trainer.current_epoch
            ]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so both modes are complete here.
        self._finish(trainer, pl_module, [m for m in ("train", "eval") if m in self.modes], trainer.current_epoch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and "eval" in self.modes:  # `manynets validate`: no training epoch
            self._finish(trainer, pl_module, ["eval"], trainer.current_epoch, csv_name="saturation_validate.csv")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.modes:
            self._finish(trainer, pl_module, ["test"], trainer.current_epoch, csv_name="saturation_test.csv")

    def compute(self, mode: str) -> dict[str, tuple[int, float]]:
        """``{layer: (intrinsic dimension, saturation)}`` of one mode (collective under DDP; resets the sums)."""
        return self.tracker.compute(mode) if self.tracker is not None else {}

    def _finish(self, trainer, pl_module, modes: list[str], epoch: int, csv_name: str = "saturation.csv") -> None:
        row: dict[str, float] = {"epoch": epoch}
        by_mode: dict[str, dict[str, float]] = {}
        for mode in modes:
            results = self.compute(mode)
            by_mode[mode] = {name: sat for name, (_, sat) in results.items()}
            for name, (idim, sat) in results.items():
                row[f"saturation/{mode}/{name}"] = sat
                row[f"idim/{mode}/{name}"] = idim
        if len(row) == 1:
            return
        self.last = row
        metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
        if trainer.logger is not None and not trainer.sanity_checking:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        directory = output_dir(trainer, self.dirpath)
        rows = self.rows if csv_name == "saturation.csv" else []  # test/validate runs: one row
        rows.append(row)
        write_csv(directory / csv_name, rows, UNITS)
        if self.plot:
            tag, run = csv_name.removesuffix(".csv"), run_name(trainer)
            fig = plot_saturation(by_mode, self.tracker.names, titled(f"saturation, epoch {epoch}, δ = {self.delta}", run))
            save_figure(trainer, fig, directory, f"{tag}_epoch{epoch:03d}", tag=tag)
            if csv_name == "saturation.csv":  # a fit: the heatmap of every epoch so far
                heatmap = plot_saturation_heatmap(rows, titled(f"saturation per epoch and layer, δ = {self.delta}", run))
                if heatmap is not None:
                    save_figure(trainer, heatmap, directory, "saturation_heatmap")

"""Write the receptive field of every conv layer of the backbone at the start of a run (spec §2.7).

The CSV ``receptive_field.csv`` (comma-separated like every manynets table; PHD-LAB's is ``;``-separated:
``layer, map_size (positions), start (px), jump (px), receptive_field (px)``) and the figure
``receptive_field.png`` (receptive field per conv layer against the input size) land in ``dirpath``
(default: the trainer's ``log_dir``); the computation is
:func:`manynets.analysis.receptive_field.receptive_fields`.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl

from manynets.analysis import output_dir, receptive_fields, run_name, save_figure, titled, write_receptive_fields
from manynets.analysis.receptive_field import plot_receptive_fields


class ReceptiveField(pl.Callback):
    """Receptive fields of the backbone's conv layers, written once per run on rank 0.

    Args:
        remove_skips: ignore skip paths (``shortcut``/``downsample`` modules), as PHD-LAB's noskip rebuild.
        avgpool: ``nan`` (PHD-LAB: AvgPool2d makes the rest undefined) or ``pool``.
        dirpath: output folder (default: the trainer's ``log_dir``).
        plot: also draw ``receptive_field.png``.
    """

    def __init__(self, remove_skips: bool = True, avgpool: Literal["nan", "pool"] = "nan", dirpath: str | None = None,
                 plot: bool = True):  # fmt: skip
        super().__init__()
        self.remove_skips, self.avgpool, self.dirpath, self.plot = remove_skips, avgpool, dirpath, plot
        self.rows = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.rows or not trainer.is_global_zero:
            return
        network = getattr(pl_module, "network", pl_module)
        shape = tuple(getattr(pl_module, "image_shape", None) or (3, 32, 32))
        self.rows = receptive_fields(network, shape, self.remove_skips, self.avgpool)
        directory = output_dir(trainer, self.dirpath)
        write_receptive_fields(self.rows, directory / "receptive_field.csv")
        if self.plot:
            title = titled(f"receptive field per conv layer, {shape[-1]} px input", run_name(trainer))
            save_figure(trainer, plot_receptive_fields(self.rows, shape[-1], title), directory, "receptive_field")

"""Write the receptive field of every conv layer of the backbone at the start of a run (spec §2.7).

The CSV ``receptive_field.csv`` (comma-separated; PHD-LAB's is ``;``-separated: ``layer,
map_size (positions), start (px), jump (px), receptive_field (px)``) lands in ``dirpath`` (default: the
trainer's ``log_dir``); the computation is :func:`manynets.analysis.receptive_field.receptive_fields`.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl

from manynets.analysis import output_dir, receptive_fields, write_receptive_fields


class ReceptiveField(pl.Callback):
    """Receptive fields of the backbone's conv layers, written once per run on rank 0.

    Args:
        remove_skips: ignore skip paths (``shortcut``/``downsample`` modules), as PHD-LAB's noskip rebuild.
        avgpool: ``nan`` (PHD-LAB: AvgPool2d makes the rest undefined) or ``pool``.
        dirpath: output folder (default: the trainer's ``log_dir``).
    """

    def __init__(self, remove_skips: bool = True, avgpool: Literal["nan", "pool"] = "nan", dirpath: str | None = None):
        super().__init__()
        self.remove_skips, self.avgpool, self.dirpath = remove_skips, avgpool, dirpath
        self.rows = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.rows or not trainer.is_global_zero:
            return
        network = getattr(pl_module, "network", pl_module)
        shape = tuple(getattr(pl_module, "image_shape", None) or (3, 32, 32))
        self.rows = receptive_fields(network, shape, self.remove_skips, self.avgpool)
        write_receptive_fields(self.rows, output_dir(trainer, self.dirpath) / "receptive_field.csv")

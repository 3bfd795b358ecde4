"""PHD-LAB's ``project`` mode as a test-time callback (spec pinet_saturation §2.7-2.8).

After ``manynets test`` it fits PCA projections (:mod:`manynets.analysis.pca`) after the chosen layers
of the model on the training split (eval mode), then re-evaluates the model's default prediction on
the first test set for every delta of the sweep and writes ``pca_sweep.csv`` (delta, accuracy, loss,
summed dimension, summed width, mean saturation; with ``random_control`` also the
random-orthonormal-subspace control; comma-separated, units in the header) and ``pca_sweep.png``
(accuracy and summed dimension against 1 - delta).

    manynets test --config configs/probe/cifar10_vgg_saturation.yaml --ckpt_path <ckpt> \\
      --trainer.callbacks+=manynets.callbacks.PCADeltaSweep
"""

from __future__ import annotations

import lightning.pytorch as pl

from manynets.analysis import (
    SWEEP_DELTAS,
    check_layer_options,
    delta_sweep,
    output_dir,
    prediction,
    run_name,
    save_figure,
    titled,
    train_and_test_loaders,
)
from manynets.analysis.pca import plot_delta_sweep
from manynets.errors import check_arg


class PCADeltaSweep(pl.Callback):
    """Delta sweep of PCA projections after testing (rank 0).

    Args:
        layers: regular expression on the layer names that get a projection (``-``-joined module paths, as
            :class:`~manynets.callbacks.Saturation`; ``None``: all); the logits layer is always left alone.
        types: module class names that get a projection (``Conv2d``, ``Linear``, ...).
        deltas: thresholds (default: PHD-LAB's 0.90 ... 0.9999 and 3.0).
        centering: centred covariance and projection.
        downsampling: conv maps larger than d x d are resized (nearest) for the covariance.
        random_control: also evaluate a random orthonormal subspace of the same dimension per layer.
        dirpath: folder of ``pca_sweep.csv`` (default: the trainer's ``log_dir``).
    """

    def __init__(
        self,
        layers: str | None = None,
        types: list[str] = ["Conv2d", "Linear"],  # noqa: B006
        deltas: list[float] | None = None,
        centering: bool = True,
        downsampling: int | None = None,
        random_control: bool = True,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        c = "trainer.callbacks[PCADeltaSweep].init_args."
        check_layer_options(c, layers, types)
        check_arg(all(d > 0 for d in deltas or ()), c + "deltas", deltas, "thresholds > 0 (fractions such as 0.99; "
                  "values > 1 keep every direction)", "A delta is a fraction: 0.99, not 99.")
        check_arg(downsampling is None or downsampling >= 1, c + "downsampling", downsampling, "null or a side >= 1")
        self.layers, self.types, self.deltas = layers, list(types), list(deltas or SWEEP_DELTAS)
        self.centering, self.downsampling, self.random_control, self.dirpath = centering, downsampling, random_control, dirpath
        self.rows: list[dict[str, float]] = []

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        train, test = train_and_test_loaders(trainer, "PCADeltaSweep")
        out = output_dir(trainer, self.dirpath)
        self.rows = delta_sweep(
            pl_module, train, test, out / "pca_sweep.csv", self.deltas, self.layers,
            self.types, self.centering, self.downsampling, self.random_control, predict=prediction(pl_module),
        )  # fmt: skip
        title = titled("test accuracy with PCA projections after every layer", run_name(trainer))
        save_figure(trainer, plot_delta_sweep(self.rows, title), out, "pca_sweep")

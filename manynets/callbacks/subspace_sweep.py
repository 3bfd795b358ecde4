"""Evaluation sweep of a trained subspace after testing (spec §3.4): points along a line or curve, pair
ensembles, diversity, and simplex ensembles (:mod:`manynets.analysis.subspace_sweep`), written to
``subspace_sweep.csv`` (comma-separated, units in the header) with PNG figures, also sent to the logger
with the headline numbers (``sweep/...``). Runs at the end of ``manynets test`` (and of ``fit`` with
``at_fit_end``) on the first test set, on rank 0.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from manynets.analysis import output_dir, run_name, save_figure, train_and_test_loaders, write_csv
from manynets.analysis.subspace_plots import sweep_figures
from manynets.analysis.subspace_sweep import UNITS, run_sweep, summary
from manynets.errors import check_arg


class SubspaceSweep(Callback):
    """Sweep a trained :class:`~manynets.lightning_modules.SubspaceModule` (see module doc).

    Args:
        num_alphas: grid size of α₀ on [0, 1] for lines and curves (21: step 0.05).
        num_random_points: random Dirichlet(1) points of a simplex (ensembles of 2..R of them).
        points_per_pass: points evaluated together in one packed forward (grouped convs). None: all
            points on a GPU, 1 on a CPU (there, grouped convs are slower than separate ones:
            benchmarks/subspaces.py). Lower it if GPU memory runs out; 1 works for any network (see
            ``check_packed``). The training data is read once in every case.
        bn_batches: training batches used for the BN statistics (None: the whole epoch, official).
        recompute_bn: recompute the BN statistics of every point (official); False uses the shared ones.
        dirpath: where ``subspace_sweep.csv`` and the PNGs go (default: the trainer's log dir).
        at_fit_end: also run at the end of ``fit`` (the quickstart ends with the plot this way).
        seed: seed of the random simplex points.
    """

    def __init__(
        self,
        num_alphas: int = 21,
        num_random_points: int = 8,
        points_per_pass: int | None = None,
        bn_batches: int | None = None,
        recompute_bn: bool = True,
        dirpath: str | None = None,
        at_fit_end: bool = False,
        seed: int = 0,
    ) -> None:
        c = "trainer.callbacks[SubspaceSweep].init_args."
        check_arg(num_alphas >= 2, c + "num_alphas", num_alphas, ">= 2 (0 and 1 included)", "21 gives steps of 0.05.")
        check_arg(num_random_points >= 2, c + "num_random_points", num_random_points, ">= 2 (random ensembles)")
        check_arg(points_per_pass is None or points_per_pass >= 1, c + "points_per_pass", points_per_pass,
                  "null (all on a GPU, 1 on a CPU) or >= 1")
        check_arg(bn_batches is None or bn_batches >= 1, c + "bn_batches", bn_batches, "null (whole epoch) or >= 1")
        self.num_alphas, self.num_random_points = num_alphas, num_random_points
        self.points_per_pass, self.bn_batches, self.recompute_bn = points_per_pass, bn_batches, recompute_bn
        self.dirpath, self.at_fit_end, self.seed = dirpath, at_fit_end, seed
        self.rows: list[dict] | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict] | None:
        if not hasattr(pl_module, "kind") or not hasattr(pl_module, "network"):
            raise TypeError(f"SubspaceSweep needs a SubspaceModule, got {type(pl_module).__name__}; remove the "
                            "callback from trainer.callbacks or train a subspace.")  # fmt: skip
        if not trainer.is_global_zero:
            return None
        train_loader, test_loader = train_and_test_loaders(trainer, "SubspaceSweep")
        with torch.inference_mode(False):
            rows = run_sweep(
                pl_module.network, pl_module.kind, pl_module.num_vertices, pl_module.num_classes,
                train_loader, test_loader, self.num_alphas, self.num_random_points,
                self.points_per_pass, self.bn_batches, self.recompute_bn, self.seed,
            )  # fmt: skip
        self.rows = rows
        out = output_dir(trainer, self.dirpath)
        write_csv(out / "subspace_sweep.csv", rows, UNITS)
        metrics = summary(rows, pl_module.kind)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for name, fig in sweep_figures(rows, pl_module.kind, run_name(trainer)).items():
            save_figure(trainer, fig, out, name, tag=f"sweep/{name}", dpi=120)
        return rows

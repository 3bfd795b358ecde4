"""PHD-LAB's ``project`` mode: PCA projections after chosen layers and the delta sweep (spec
pinet_saturation §2.7-2.8; PHD-LAB ``infer_with_altering_delta.py``; Richter et al., arXiv 2006.08679).

:func:`insert_pca_layers` attaches a :class:`~manynets.layers.pca.PCAProjection` (the math) after every
chosen layer through a :class:`~manynets.analysis.tap.LayerTap` whose hook replaces the output (nothing in
the network changes); :func:`delta_sweep` fits them on training data (eval mode) and evaluates the test
accuracy, loss, summed dimension and mean saturation for each delta of :data:`SWEEP_DELTAS`;
:func:`plot_delta_sweep` draws them against 1 - delta.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from manynets.analysis.outputs import legend_outside, write_csv
from manynets.analysis.passes import device_of, each_batch, evaluate
from manynets.analysis.progress import Progress, tracked
from manynets.analysis.selection import layer_width, select_layers
from manynets.analysis.tap import LayerTap
from manynets.layers.pca import PCAProjection

SWEEP_DELTAS: tuple[float, ...] = (
    *[round(0.90 + 0.01 * i, 2) for i in range(10)],
    0.992, 0.994, 0.996, 0.998, 0.999,
    *[round(0.9991 + 0.0001 * i, 4) for i in range(9)],
    3.0,
)  # fmt: skip
"""The deltas of PHD-LAB's ``infer_with_altering_delta.py`` (its duplicated 0.999 is listed once)."""

UNITS = {"delta": "fraction", "accuracy": "fraction", "loss": "nats", "sum_id": "dimensions",
         "sum_width": "dimensions", "mean_saturation": "fraction", "random_accuracy": "fraction",
         "random_loss": "nats"}  # fmt: skip


class PCALayers:
    """Projections attached to named layers (``layers``: name -> projection); :meth:`remove` detaches them."""

    def __init__(self, layers: dict[str, PCAProjection], tap: LayerTap) -> None:
        self.layers, self.tap = layers, tap

    def fitting(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.fitting = on

    def finalize(self) -> None:
        for layer in self.layers.values():
            layer.finalize()

    def set_delta(self, delta: float) -> None:
        for layer in self.layers.values():
            layer.set_delta(delta)

    def use_random_basis(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.use_random_basis(g)

    def summary(self) -> dict[str, float]:
        dims = [layer.k for layer in self.layers.values()]
        widths = [layer.num_features for layer in self.layers.values()]
        sats = [layer.saturation for layer in self.layers.values()]
        return {"sum_id": sum(dims), "sum_width": sum(widths), "mean_saturation": sum(sats) / len(sats)}

    def remove(self) -> None:
        self.tap.remove()


def insert_pca_layers(
    model: nn.Module,
    layers: str | None = None,
    types: Iterable[str] = ("Conv2d", "Linear"),
    delta: float = 0.99,
    centering: bool = True,
    downsampling: int | None = None,
    exclude_last: bool = True,
) -> PCALayers:
    """Attach a :class:`PCAProjection` after every chosen layer (:func:`~manynets.analysis.select_layers`);
    ``exclude_last`` leaves the last chosen layer (the logits of a backbone) alone, as PHD-LAB's PCA models do."""
    chosen = select_layers(model, layers, tuple(types))
    if exclude_last and len(chosen) > 1:
        chosen.pop(list(chosen)[-1])
    device = device_of(model)
    projections = {
        name: PCAProjection(layer_width(module), delta, centering, downsampling).to(device)
        for name, module in chosen.items()
    }
    return PCALayers(projections, LayerTap(chosen, lambda name, out: projections[name](out)))


def delta_sweep(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    csv_path: str | Path | None = None,
    deltas: Iterable[float] = SWEEP_DELTAS,
    layers: str | None = None,
    types: Iterable[str] = ("Conv2d", "Linear"),
    centering: bool = True,
    downsampling: int | None = None,
    random_control: bool = False,
    seed: int = 0,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Spec §2.7 ``project`` mode on a trained ``model`` (prediction: ``predict``, default ``model(x)``).

    The covariances are fitted on ``train_loader`` with the model in eval mode (BN running statistics),
    then for every delta the test accuracy, loss, summed dimension (PCA-layer count), summed width and
    mean saturation are recorded; ``random_control`` adds the same with a random orthonormal subspace of
    equal dimension per layer. Rows are written to ``csv_path`` if given.
    """
    predict = predict or model
    pca = insert_pca_layers(model, layers, types, 0.99, centering, downsampling)
    rows = []
    try:
        each_batch(model, tracked(train_loader, "PCA sweep, covariances"), lambda images, labels: predict(images))
        pca.finalize()
        deltas = list(deltas)
        progress = Progress("PCA sweep, deltas", len(deltas), "deltas")
        for delta in deltas:
            pca.set_delta(delta)
            acc, loss = evaluate(model, test_loader, predict)
            row = {"delta": delta, "accuracy": acc, "loss": loss, **pca.summary()}
            if random_control:
                pca.use_random_basis(seed)
                row["random_accuracy"], row["random_loss"] = evaluate(model, test_loader, predict)
            rows.append(row)
            progress.update()
    finally:
        pca.remove()
    if csv_path is not None:
        write_csv(csv_path, rows, UNITS)
    return rows


def plot_delta_sweep(rows: list[dict[str, float | str]], title: str):
    """Test accuracy (with the random-subspace control where recorded) and summed intrinsic dimension against
    1 - delta (log scale; a delta >= 1 keeps every direction and is drawn as a horizontal line).
    ``rows``: :func:`delta_sweep` rows or ``pca_sweep.csv`` read back. Returns the Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def number(row, key):
        value = row.get(key, "")
        return float("nan") if value in ("", None) else float(value)

    projected = sorted((r for r in rows if number(r, "delta") < 1), key=lambda r: -number(r, "delta"))
    full = [r for r in rows if number(r, "delta") >= 1]
    x = [1 - number(r, "delta") for r in projected]
    fig, (acc, dims) = plt.subplots(1, 2, figsize=(11, 3.8))
    acc.plot(x, [number(r, "accuracy") for r in projected], "o-", ms=3, label="PCA subspace")
    if any(r.get("random_accuracy", "") not in ("", None) for r in projected):
        acc.plot(x, [number(r, "random_accuracy") for r in projected], "s--", ms=3, label="random subspace, same dimension")
    if full:
        acc.axhline(number(full[0], "accuracy"), color="black", ls=":", label="no projection")
    dims.plot(x, [number(r, "sum_id") for r in projected], "o-", ms=3, color="C2", label="kept dimensions")
    if projected:
        dims.axhline(number(projected[0], "sum_width"), color="black", ls=":", label="summed layer width")
    for ax in (acc, dims):
        ax.set_xscale("log")
        ax.set_xlabel("1 − δ (unexplained variance allowed, fraction)")
        ax.grid(alpha=0.3)
    acc.set_ylabel("test accuracy (fraction)")
    dims.set_ylabel("summed intrinsic dimension (dimensions)")
    legend_outside(acc, fontsize=8)
    legend_outside(dims, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

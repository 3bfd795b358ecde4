"""Whole-epoch saturation of named layers (spec pinet_saturation §2.1-2.3; delve / PHD-LAB).

:class:`SaturationTracker` taps the raw outputs of chosen layers (:class:`~manynets.analysis.tap.LayerTap`)
and, per mode (``train``, ``eval``, ``test``), accumulates a float64 covariance of every recorded batch
(:class:`~manynets.layers.covariance.StreamingCovariance`); :meth:`~SaturationTracker.compute` all-reduces
the sums over DDP ranks and returns the intrinsic dimension and the saturation ID / D of each layer
(``manynets.layers.covariance``, §2.2). D is the width of the layer's samples (channels of a conv map,
features of a vector). :func:`plot_saturation` draws the per-layer bars of one epoch,
:func:`plot_saturation_heatmap` the epoch x layer heatmap of ``saturation.csv``.
"""

from __future__ import annotations

import torch
from torch import nn

from manynets.analysis.outputs import layer_labels, legend_outside
from manynets.analysis.tap import LayerTap
from manynets.layers.covariance import (
    ConvMethod,
    Count,
    StreamingCovariance,
    count_from_eigenvalues,
    eigen_descending,
    layer_samples,
    resized_map,
)


class SaturationTracker:
    """Covariances of the outputs of ``modules`` (name -> module) per mode; records while :attr:`mode` is set.

    Outputs are kept (detached) during a batch and added at :meth:`flush`, after the backward pass: the
    same products, ~2 points of step time cheaper on a CPU than inside the forward hooks (they no longer
    interleave with the forward pass); the outputs are alive until then anyway (autograd saves them).

    Args:
        delta, count: threshold and counting rule of the intrinsic dimension (spec §2.2).
        conv_method, downsampling: how a conv map becomes samples (spec §2.1, ``layer_samples``).
        matmul_dtype: ``torch.float32`` (default: float32 products of the mean-shifted outputs, summed in float64;
            eigenvalues within 1e-6 of the largest and the same saturation as float64, benchmarks/probe.py) or
            ``torch.float64`` products (delve).
    """

    def __init__(self, modules: dict[str, nn.Module], delta: float = 0.99, count: Count = "delve",
                 conv_method: ConvMethod = "channelwise", downsampling: int | None = None,
                 matmul_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self.names = list(modules)
        self.delta, self.count, self.conv_method, self.downsampling = delta, count, conv_method, downsampling
        self.matmul_dtype = matmul_dtype
        self.covariances: dict[str, dict[str, StreamingCovariance]] = {}
        self.mode: str | None = None
        self._pending: list[tuple[str, torch.Tensor]] = []
        self.tap = LayerTap(modules, self._record)

    def _record(self, name: str, output: torch.Tensor) -> None:
        if self.mode is not None:
            self._pending.append((name, output.detach()))

    def start(self, mode: str | None) -> None:
        """Record the next batch's outputs under ``mode`` (``None``: do not record)."""
        self.mode, self._pending = mode, []

    def flush(self) -> None:
        """Add the outputs recorded since :meth:`start` to the covariances of the current mode."""
        mode, pending, self._pending = self.mode, self._pending, []
        if mode is None:
            return
        per_mode = self.covariances.setdefault(mode, {})
        for name, output in pending:
            maps = output.dim() == 4 and self.conv_method == "channelwise"
            samples = resized_map(output, self.downsampling) if maps else layer_samples(output, self.conv_method)
            if name not in per_mode:
                per_mode[name] = StreamingCovariance(samples.shape[1], samples.device, self.matmul_dtype)
            if maps:  # (B, C, H, W): written once in the GEMM's layout, no (B*H*W, C) copy
                per_mode[name].update_maps(samples)
            else:
                per_mode[name].update(samples)

    def compute(self, mode: str) -> dict[str, tuple[int, float]]:
        """All-reduce and evaluate one mode: ``{layer: (intrinsic dimension, saturation)}``; resets the sums.

        Every rank must call it (collective); every layer is reduced in the same order on every rank.
        """
        results = {}
        per_mode = self.covariances.get(mode, {})
        for name in self.names:
            cov = per_mode.get(name)
            if cov is None:
                continue
            cov.all_reduce()
            if cov.n == 0:
                continue
            idim = count_from_eigenvalues(eigen_descending(cov.covariance())[0], self.delta, self.count)
            results[name] = (idim, idim / cov.dim)
            cov.reset()
        return results

    def remove(self) -> None:
        """Remove the hooks."""
        self.tap.remove()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_saturation(by_mode: dict[str, dict[str, float]], names: list[str], title: str):
    """Grouped bars of the saturation (ID / D, a fraction in [0, 1]) per layer, one colour per mode.

    Layers in network order, labelled by :func:`~manynets.analysis.outputs.layer_labels`; ``title`` should
    name the run (:func:`~manynets.analysis.outputs.titled`). Returns the Figure (not saved).
    """
    plt = _pyplot()
    names = [n for n in names if any(n in v for v in by_mode.values())]
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(names) + 4), 4))
    width = 0.8 / max(len(by_mode), 1)
    for i, (mode, values) in enumerate(by_mode.items()):
        xs = [j + (i - (len(by_mode) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [values.get(n, float("nan")) for n in names], width, label=MODE_LABELS.get(mode, mode))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(layer_labels(names), rotation=90, fontsize=7)
    ax.set_xlabel("layer (module path, input to output)")
    ax.set_ylabel("saturation ID / D (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    legend_outside(ax, title="batches")
    fig.tight_layout()
    return fig


MODE_LABELS = {"train": "training", "eval": "validation", "test": "test"}


def saturation_table(rows: list[dict[str, float | str]], mode: str,
                     layers: list[str] | None = None) -> tuple[list[int], list[str], list[list[float]]]:  # fmt: skip
    """Epochs, layers and the (epoch x layer) saturation of one mode from ``saturation.csv`` rows (keys
    ``epoch`` and ``saturation/{mode}/{layer}`` as :func:`~manynets.analysis.outputs.read_csv` gives them);
    ``layers`` fixes the columns (default: the mode's layers in file order). Missing values are NaN."""
    prefix = f"saturation/{mode}/"
    if layers is None:
        layers = list(dict.fromkeys(k[len(prefix):] for row in rows for k in row if k.startswith(prefix)))
    table = sorted((int(float(row["epoch"])), row) for row in rows if any(k.startswith(prefix) for k in row))
    values = [[_number(row.get(prefix + n)) for n in layers] for _, row in table]
    return [epoch for epoch, _ in table], layers, values


def _number(value: float | str | None) -> float:
    return float("nan") if value is None or value == "" else float(value)


def plot_saturation_heatmap(rows: list[dict[str, float | str]], title: str, modes: tuple[str, ...] = ("train", "eval")):
    """Epoch x layer heatmap of the saturation (fraction, one colour scale 0-1), one panel per recorded mode,
    from the rows of ``saturation.csv``. Returns the Figure (not saved); ``None`` if no mode has a row."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = list(dict.fromkeys(n for mode in modes for n in saturation_table(rows, mode)[1]))
    panels = [(mode, *saturation_table(rows, mode, layers)) for mode in modes]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    epochs = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, sharex=True, layout="constrained",
                             figsize=(max(6, 0.35 * len(layers) + 2.5), 1.6 + len(panels) * max(1.6, 0.25 * epochs)))  # fmt: skip
    for ax, (mode, epoch_list, names, values) in zip(axes[:, 0], panels):
        image = ax.imshow(values, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest",
                          extent=(-0.5, len(names) - 0.5, epoch_list[-1] + 0.5, epoch_list[0] - 0.5))  # fmt: skip
        ax.set_ylabel("epoch (from 0)")
        ax.set_title(f"{MODE_LABELS.get(mode, mode)} batches", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(len(epoch_list), 10), integer=True))
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="saturation ID / D (fraction)", fraction=0.04, pad=0.01)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(layers)))
    bottom.set_xticklabels(layer_labels(layers), rotation=90, fontsize=7)
    bottom.set_xlabel("layer (module path, input to output)")
    fig.suptitle(title)
    return fig

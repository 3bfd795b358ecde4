"""Whole-epoch saturation of named layers (spec pinet_saturation §2.1-2.3; delve / PHD-LAB).

:class:`SaturationTracker` taps the raw outputs of chosen layers (:class:`~manynets.analysis.tap.LayerTap`)
and, per mode (``train``, ``eval``, ``test``), accumulates a float64 covariance of every recorded batch
(:class:`~manynets.layers.covariance.StreamingCovariance`); :meth:`~SaturationTracker.compute` all-reduces
the sums over DDP ranks and returns the intrinsic dimension and the saturation ID / D of each layer
(``manynets.layers.covariance``, §2.2). D is the width of the layer's samples (channels of a conv map,
features of a vector). :func:`plot_saturation` draws the per-layer bar plot.
"""

from __future__ import annotations

import torch
from torch import nn

from manynets.analysis.tap import LayerTap
from manynets.layers.covariance import (
    ConvMethod,
    Count,
    StreamingCovariance,
    count_from_eigenvalues,
    eigen_descending,
    layer_samples,
)


class SaturationTracker:
    """Covariances of the outputs of ``modules`` (name -> module) per mode; records while :attr:`mode` is set.

    Outputs are kept (detached) during a batch and added at :meth:`flush`, after the backward pass: the
    same products, ~2 points of step time cheaper on a CPU than inside the forward hooks (they no longer
    interleave with the forward pass); the outputs are alive until then anyway (autograd saves them).

    Args:
        delta, count: threshold and counting rule of the intrinsic dimension (spec §2.2).
        conv_method, downsampling: how a conv map becomes samples (spec §2.1, ``layer_samples``).
        matmul_dtype: ``torch.float64`` (delve) or ``torch.float32`` products (still accumulated in float64).
    """

    def __init__(self, modules: dict[str, nn.Module], delta: float = 0.99, count: Count = "delve",
                 conv_method: ConvMethod = "channelwise", downsampling: int | None = None,
                 matmul_dtype: torch.dtype = torch.float64) -> None:  # fmt: skip
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
            samples = layer_samples(output, self.conv_method, self.downsampling)
            if name not in per_mode:
                per_mode[name] = StreamingCovariance(samples.shape[1], samples.device, self.matmul_dtype)
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


def plot_saturation(by_mode: dict[str, dict[str, float]], names: list[str], title: str):
    """Grouped bar plot of the saturation (a fraction in [0, 1]) per layer, one colour per mode (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [n for n in names if any(n in v for v in by_mode.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    width = 0.8 / max(len(by_mode), 1)
    for i, (mode, values) in enumerate(by_mode.items()):
        xs = [j + (i - (len(by_mode) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [values.get(n, float("nan")) for n in names], width, label=mode)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("saturation (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig

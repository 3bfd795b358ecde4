"""Probe features over a data set and the probe results' table and figure (spec pinet_saturation §2.7
``extract``/``probes``; the probe math is :mod:`manynets.layers.probes`).

:func:`extract_features` reads a loader once with the chosen layers tapped and keeps the pooled
features in memory (the scikit-learn reference of :class:`~manynets.lightning_modules.ProbeModule`).
:func:`write_probe_results` writes ``probes.csv`` (one row per layer or position; accuracies are
fractions) and the figure ``probes.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from manynets.analysis.outputs import save_figure, write_csv
from manynets.analysis.passes import each_batch
from manynets.analysis.tap import LayerTap
from manynets.layers.probes import probe_features


def extract_features(
    network: nn.Module,
    modules: dict[str, nn.Module],
    loader: Iterable,
    pool_size: int | None = 4,
    device: torch.device | str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features (N, F) of every named module and the labels over ``loader`` (eval mode, in memory)."""
    feats: dict[str, list[np.ndarray]] = {n: [] for n in modules}
    labels: list[np.ndarray] = []
    with LayerTap(modules) as tap:

        def collect(images: torch.Tensor, y: torch.Tensor) -> None:
            network(images)
            for name in modules:
                feats[name].append(probe_features(tap.outputs[name], pool_size)[:, 0].float().cpu().numpy())
            labels.append(y.cpu().numpy())

        each_batch(network, loader, collect, device)
    return {n: np.concatenate(v) for n, v in feats.items()}, np.concatenate(labels)


def write_probe_results(results: dict[str, dict[str, float]], directory: str | Path, trainer: Any = None,
                        plot: bool = True) -> Path:  # fmt: skip
    """``probes.csv`` (layer, then the accuracy columns sorted by name; fractions) and, with ``plot``,
    ``probes.png`` (accuracy per layer, one line per column; also sent to the trainer's loggers)."""
    columns = sorted({k for row in results.values() for k in row})
    rows = [{"layer": name, **row} for name, row in results.items()]
    path = write_csv(Path(directory) / "probes.csv", rows, dict.fromkeys(columns, "fraction"), ["layer", *columns])
    if plot:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = list(results)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
        for column in columns:
            ax.plot(range(len(names)), [results[n].get(column, float("nan")) for n in names], "o-", label=column)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("probe accuracy (fraction)")
        ax.legend()
        fig.tight_layout()
        save_figure(trainer, fig, directory, "probes")
    return path

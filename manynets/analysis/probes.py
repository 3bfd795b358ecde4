"""Probe features over a data set and the probe results' table and figure (spec pinet_saturation §2.7
``extract``/``probes``; the probe math is :mod:`manynets.layers.probes`).

:func:`extract_features` reads a loader once with the chosen layers tapped and keeps the pooled
features in memory (the scikit-learn reference of :class:`~manynets.lightning_modules.ProbeModule`).
:func:`write_probe_results` writes ``probes.csv`` (one row per layer or position; accuracies are
fractions) and the figure ``probes.png`` (:func:`plot_probes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from manynets.analysis.outputs import layer_labels, legend_outside, run_name, save_figure, titled, write_csv
from manynets.analysis.passes import each_batch
from manynets.analysis.progress import tracked
from manynets.analysis.tap import LayerTap
from manynets.layers.probes import probe_features


def extract_features(
    network: nn.Module,
    modules: dict[str, nn.Module],
    loader: Iterable,
    pool_size: int | None = 4,
    device: torch.device | str | None = None,
    what: str = "probe features",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features (N, F) of every named module and the labels over ``loader`` (eval mode, in memory);
    progress lines are headed ``what``."""
    feats: dict[str, list[np.ndarray]] = {n: [] for n in modules}
    labels: list[np.ndarray] = []
    with LayerTap(modules) as tap:

        def collect(images: torch.Tensor, y: torch.Tensor) -> None:
            network(images)
            for name in modules:
                feats[name].append(probe_features(tap.outputs[name], pool_size)[:, 0].float().cpu().numpy())
            labels.append(y.cpu().numpy())

        each_batch(network, tracked(loader, what), collect, device)
    return {n: np.concatenate(v) for n, v in feats.items()}, np.concatenate(labels)


def write_probe_results(results: dict[str, dict[str, float]], directory: str | Path, trainer: Any = None,
                        plot: bool = True) -> Path:  # fmt: skip
    """``probes.csv`` (layer, then the accuracy columns sorted by name; fractions) and, with ``plot``,
    ``probes.png`` (:func:`plot_probes`; also sent to the trainer's loggers)."""
    columns = sorted({k for row in results.values() for k in row})
    rows = [{"layer": name, **row} for name, row in results.items()]
    path = write_csv(Path(directory) / "probes.csv", rows, dict.fromkeys(columns, "fraction"), ["layer", *columns])
    if plot:
        fig = plot_probes(results, titled("linear probe accuracy per layer", run_name(trainer, None if trainer else directory)))
        save_figure(trainer, fig, directory, "probes")
    return path


SPLIT_LABELS = {"train": "training split", "val": "validation split", "test": "test split"}


def probe_label(column: str) -> str:
    """Legend entry of a ``probes.csv`` column: ``test`` -> ``test split``, ``ref_test`` -> ``test split,
    scikit-learn reference``."""
    reference = column.startswith("ref_")
    split = column.removeprefix("ref_")
    label = SPLIT_LABELS.get(split, split.replace("_", " "))
    return f"{label}, scikit-learn reference" if reference else label


def plot_probes(results: dict[str, dict[str, float | str]], title: str):
    """Probe accuracy (fraction) per layer in network order, one line per split (the scikit-learn reference
    dashed); returns the Figure (not saved). ``results``: ``{layer: {column: accuracy}}`` as in ``probes.csv``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(results)
    columns = sorted({k for row in results.values() for k in row}, key=lambda c: (c.startswith("ref_"), c))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names) + 5), 4.2))
    for column in columns:
        split = column.removeprefix("ref_")
        colour = f"C{sorted({c.removeprefix('ref_') for c in columns}).index(split)}"
        values = [float("nan") if results[n].get(column, "") == "" else float(results[n][column]) for n in names]
        style = "s--" if column.startswith("ref_") else "o-"
        ax.plot(range(len(names)), values, style, color=colour, ms=4, label=probe_label(column))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(layer_labels(names), rotation=90, fontsize=7)
    ax.set_xlabel("probed layer (module path, input to output)")
    ax.set_ylabel("probe accuracy (fraction)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig

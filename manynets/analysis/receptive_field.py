"""Receptive field of every conv layer of a network (spec pinet_saturation §2.7; the arithmetic is
:mod:`manynets.layers.receptive_field`).

:func:`receptive_fields` taps the Conv2d/MaxPool2d/AvgPool2d modules (off the skip paths with
``remove_skips``), runs one forward pass of a blank image in eval mode to get their order and output
sizes, and applies the recurrence. :func:`write_receptive_fields` writes ``receptive_field.csv``,
comma-separated (PHD-LAB's file is ``;``-separated): ``layer, map_size (positions), start (px),
jump (px), receptive_field (px)`` per Conv2d, sizes in input pixels; :func:`plot_receptive_fields` draws
the receptive field per layer against the input size (layers whose field exceeds the image are PHD-LAB's
"unproductive" tail candidates, Richter et al. 2021).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from manynets.analysis.outputs import layer_labels, legend_outside, write_csv
from manynets.analysis.passes import device_of, evaluation
from manynets.analysis.tap import LayerTap
from manynets.layers.receptive_field import FIELD_LAYERS, FieldRow, field_rows, on_skip_path

UNITS = {"map_size": "positions", "start": "px", "jump": "px", "receptive_field": "px"}


def receptive_fields(
    network: nn.Module,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    remove_skips: bool = True,
    avgpool: Literal["nan", "pool"] = "nan",
) -> list[FieldRow]:
    """Rows (layer, kind, output map size, start, jump, receptive field) for every Conv2d and pooling layer;
    ``layer`` is the module path joined by ``-`` (as :func:`~manynets.analysis.select_layers` names it)."""
    modules = {
        name.replace(".", "-"): module
        for name, module in network.named_modules()
        if isinstance(module, FIELD_LAYERS) and not (remove_skips and on_skip_path(name))
    }
    chain: list[tuple[str, nn.Module, int]] = []
    with LayerTap(modules, lambda name, out: chain.append((name, modules[name], int(out.shape[-1])))):
        with evaluation(network):
            network(torch.zeros(1, *image_shape, device=device_of(network)))
    return field_rows(chain, avgpool)


def write_receptive_fields(rows: list[FieldRow], path: str | Path, convs_only: bool = True) -> Path:
    """``receptive_field.csv``: one comma-separated row per Conv2d (every row with ``convs_only=False``)."""
    table = [{k: v for k, v in asdict(row).items() if k != "kind"} for row in rows
             if not convs_only or row.kind == "Conv2d"]  # fmt: skip
    return write_csv(path, table, UNITS, columns=("layer", "map_size", "start", "jump", "receptive_field"))


def plot_receptive_fields(rows: list[FieldRow | dict], image_size: int, title: str):
    """Receptive field (px) of every Conv2d row in network order, with the input image size as a line;
    ``rows``: :class:`FieldRow` or ``receptive_field.csv`` rows. Returns the Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = [asdict(r) if isinstance(r, FieldRow) else r for r in rows]
    table = [r for r in table if r.get("kind", "Conv2d") == "Conv2d"]
    names = [str(r["layer"]) for r in table]
    fields = [float(r["receptive_field"]) if r["receptive_field"] not in ("", None) else float("nan") for r in table]
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(names) + 4), 4))
    for larger, colour, label in ((False, "C0", "receptive field within the input"),
                                  (True, "C3", "receptive field larger than the input")):  # fmt: skip
        index = [i for i, f in enumerate(fields) if (f > image_size) == larger]
        if index:
            ax.bar(index, [fields[i] for i in index], color=colour, label=label)
    ax.axhline(image_size, color="black", ls="--", lw=1, label=f"input size ({image_size} px)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(layer_labels(names), rotation=90, fontsize=7)
    ax.set_xlabel("conv layer (module path, input to output)")
    ax.set_ylabel("receptive field (px)")
    ax.set_title(title)
    legend_outside(ax)
    fig.tight_layout()
    return fig

"""Receptive field of every conv layer of any backbone (spec pinet_saturation §2.7, PHD-LAB
``phd_lab/experiments/utils/receptive_field.py``; Araujo et al. 2019, "Computing receptive fields").

The layers that move the receptive field (Conv2d, MaxPool2d, AvgPool2d) are visited in the order of
one forward pass and the recurrence is applied, starting from ``j = 1``, ``r = 1``, ``start = 0.5``;
with the effective kernel ``k_eff = k + (k - 1)(dilation - 1)``:

    j   <- j * stride
    r   <- r + (k_eff - 1) * j_prev
    start <- start + ((k_eff - 1) / 2 - padding) * j_prev

Normalisation layers pass through. As in the original, residual connections are ignored: with
``remove_skips=True`` (default) the modules on a skip path (names containing ``shortcut`` or
``downsample``, the manynets and torchvision names) are left out, which is what PHD-LAB's
``noskip=True`` rebuild of a ResNet computes. AvgPool2d with ``avgpool="nan"`` (PHD-LAB) makes the
rest NaN; ``avgpool="pool"`` treats it like a max pool of the same geometry.
Adaptive pools (global pooling) end the recurrence.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

SKIP_NAMES = ("shortcut", "downsample")


@dataclass
class FieldRow:
    layer: str
    kind: str
    map_size: int
    start: float
    jump: float
    receptive_field: float


def _pair(v) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square kernel/stride/padding {v}: the recurrence here is for square layers")
        return int(v[0])
    return int(v)


def receptive_fields(
    network: nn.Module,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    remove_skips: bool = True,
    avgpool: Literal["nan", "pool"] = "nan",
) -> list[FieldRow]:
    """Rows (layer name, kind, output map size, start, jump, receptive field) for every Conv2d and pooling layer.

    ``layer`` is the module path joined by ``-`` (as in :mod:`manynets.callbacks.saturation`).
    """
    order: list[tuple[str, nn.Module, int]] = []
    handles = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    for name, module in network.named_modules():
        if not isinstance(module, kinds):
            continue
        if remove_skips and any(part in SKIP_NAMES for part in name.split(".")):
            continue

        def hook(mod, inputs, output, name=name):
            order.append((name.replace(".", "-"), mod, int(output.shape[-1])))

        handles.append(module.register_forward_hook(hook))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, *image_shape))
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)

    j, r, start = 1.0, 1.0, 0.5
    rows = []
    for name, module, size in order:
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        dil = _pair(getattr(module, "dilation", 1))
        if isinstance(module, nn.AvgPool2d) and avgpool == "nan":
            j = r = start = math.nan
        else:
            k_eff = k + (k - 1) * (dil - 1)
            j_prev = j
            j = j * s
            r = r + (k_eff - 1) * j_prev
            start = start + ((k_eff - 1) / 2 - p) * j_prev
        rows.append(FieldRow(name, type(module).__name__, size, start, j, r))
    return rows


def write_receptive_fields(rows: list[FieldRow], path: str | Path, convs_only: bool = True) -> Path:
    """CSV (``;``-separated like PHD-LAB): ``layer;map_size;start;jump;receptive_field`` per Conv2d row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["layer", "map_size", "start", "jump", "receptive_field"])
        for row in rows:
            if convs_only and row.kind != "Conv2d":
                continue
            d = asdict(row)
            writer.writerow([d["layer"], d["map_size"], d["start"], d["jump"], d["receptive_field"]])
    return path

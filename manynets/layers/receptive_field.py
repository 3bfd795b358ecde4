"""Receptive-field arithmetic of a chain of conv and pooling layers (spec pinet_saturation §2.7, PHD-LAB
``phd_lab/experiments/utils/receptive_field.py``; Araujo et al. 2019, "Computing receptive fields").

The layers that move the receptive field (Conv2d, MaxPool2d, AvgPool2d), in the order of one forward
pass, update ``j`` (jump), ``r`` (receptive field) and ``start`` from ``j = 1``, ``r = 1``,
``start = 0.5``; with the effective kernel ``k_eff = k + (k - 1)(dilation - 1)``:

    j   <- j * stride
    r   <- r + (k_eff - 1) * j_prev
    start <- start + ((k_eff - 1) / 2 - padding) * j_prev

Normalisation layers pass through. As in the original, residual connections are ignored: modules on a
skip path (:func:`on_skip_path`: names containing ``shortcut`` or ``downsample``, the manynets and
torchvision names) are left out of the chain, which is what PHD-LAB's ``noskip=True`` rebuild of a
ResNet computes. AvgPool2d with ``avgpool="nan"`` (PHD-LAB) makes the rest NaN; ``avgpool="pool"``
treats it like a max pool of the same geometry. Finding the chain in a network (one forward pass with
the layers tapped) is :mod:`manynets.analysis.receptive_field`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from torch import nn

SKIP_NAMES = ("shortcut", "downsample")
FIELD_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
"""The layer kinds that move the receptive field."""


@dataclass
class FieldRow:
    layer: str
    kind: str
    map_size: int
    start: float
    jump: float
    receptive_field: float


def on_skip_path(name: str) -> bool:
    """Whether the module path ``name`` (``.``- or ``-``-joined) lies on a residual skip path."""
    return any(part in SKIP_NAMES for part in name.replace("-", ".").split("."))


def _pair(v) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square kernel/stride/padding {v}: the recurrence here is for square layers")
        return int(v[0])
    return int(v)


def field_rows(chain: Sequence[tuple[str, nn.Module, int]], avgpool: Literal["nan", "pool"] = "nan") -> list[FieldRow]:
    """Rows (layer, kind, output map size, start, jump, receptive field) of ``chain``: the
    ``(name, layer, output side)`` of every Conv2d and pooling layer in forward order."""
    j, r, start = 1.0, 1.0, 0.5
    rows = []
    for name, module, size in chain:
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

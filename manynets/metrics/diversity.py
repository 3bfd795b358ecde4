"""Diversity of ensemble members."""

from __future__ import annotations

import itertools

import torch
from torchmetrics import Metric


class Disagreement(Metric):
    """Fraction of samples on which two members' argmax predictions differ, averaged over member pairs.

    ``update`` takes per-member logits of shape (M, B, C).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("differ", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, member_logits: torch.Tensor) -> None:
        preds = member_logits.argmax(-1)
        for i, j in itertools.combinations(range(preds.shape[0]), 2):
            self.differ += (preds[i] != preds[j]).sum().double()
            self.count += preds.shape[1]

    def compute(self) -> torch.Tensor:
        return (self.differ / self.count.clamp_min(1)).float()

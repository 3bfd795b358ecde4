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


class RatioErrors(Metric):
    """Ratio-errors of member pairs, (N01 + N10) / N00, averaged over pairs (MixMo, spec §2.4).

    N01 + N10 counts samples that exactly one of the two members gets wrong, N00 those both get
    wrong (Aksoy & Haralick 2000); higher means more diverse errors. ``update`` takes per-member
    logits (M, B, C) and labels (B,). A pair with no common error counts N00 as 1.
    """

    full_state_update = False

    def __init__(self, num_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs = list(itertools.combinations(range(num_members), 2))
        self.add_state("single", torch.zeros(len(self.pairs), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("double", torch.zeros(len(self.pairs), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, member_logits: torch.Tensor, target: torch.Tensor) -> None:
        wrong = member_logits.argmax(-1) != target  # (M, B)
        if not self.pairs:
            return
        i, j = (torch.tensor(side, device=wrong.device) for side in zip(*self.pairs))
        self.single += (wrong[i] ^ wrong[j]).sum(1).double()
        self.double += (wrong[i] & wrong[j]).sum(1).double()

    def compute(self) -> torch.Tensor:
        if not self.pairs:
            return torch.tensor(0.0)
        return (self.single / self.double.clamp_min(1)).mean().float()

"""Proper scoring rules on softmax(logits): negative log-likelihood and the Brier score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class NegativeLogLikelihood(Metric):
    """Mean over samples of -log softmax(logits)[y]."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.total += F.cross_entropy(logits.float(), target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class BrierScore(Metric):
    """Brier score: sum over classes of (p_c - 1[y = c])^2, mean over samples (Brier 1950).

    This is the standard definition; MixMo's official code further divides by the
    number of classes C (spec §2.4), so its numbers are C times smaller.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        probs = logits.float().softmax(-1)
        onehot = F.one_hot(target, probs.shape[-1]).to(probs.dtype)
        self.total += (probs - onehot).pow(2).sum().double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()

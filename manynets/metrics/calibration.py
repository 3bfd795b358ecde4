"""Scores on softmax(logits): negative log-likelihood, the Brier score and the expected calibration error.

Every metric here takes **logits** and applies the softmax itself, whatever their range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError


class _MeanOverSamples(Metric):
    """Mean over samples of a per-sample score, summed in float64 across batches and processes."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score_sum(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.total += self.score_sum(logits, target).double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class NegativeLogLikelihood(_MeanOverSamples):
    """Mean over samples of -log softmax(logits)[y]."""

    def score_sum(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, reduction="sum")


class BrierScore(_MeanOverSamples):
    """Brier score: sum over classes of (p_c - 1[y = c])^2, mean over samples (Brier 1950).

    This is the standard definition; MixMo's official code further divides by the
    number of classes C (spec §2.4), so its numbers are C times smaller.
    """

    def score_sum(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        onehot = F.one_hot(target, probs.shape[-1]).to(probs.dtype)
        return (probs - onehot).pow(2).sum()


class CalibrationError(MulticlassCalibrationError):
    """Expected calibration error (L1, equal-width bins on the max softmax probability) of **logits**.

    torchmetrics' ``MulticlassCalibrationError`` applies the softmax only when some value of the batch lies
    outside [0, 1], so a batch of logits that all happen to lie in [0, 1] would be read as probabilities;
    here the softmax is always applied.
    """

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        super().update(logits.float().softmax(-1), target)

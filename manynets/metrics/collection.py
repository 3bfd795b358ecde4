"""The shared set of classification metrics of every method (ARCHITECTURE.md, "Metrics")."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from manynets.metrics.calibration import BrierScore, CalibrationError, NegativeLogLikelihood


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """acc, nll, ece (15 equal-width bins on the max softmax probability) and brier (sum over classes,
    mean over samples) on logits (B, C) and int64 labels, each named ``{prefix}{metric}``."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "nll": NegativeLogLikelihood(),
            "ece": CalibrationError(num_classes, n_bins=15, norm="l1"),
            "brier": BrierScore(),
        },
        prefix=prefix,
    )

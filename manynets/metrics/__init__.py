"""Calibration and ensemble-diversity metrics as torchmetrics Metrics, and the shared metric set."""

from manynets.metrics.calibration import BrierScore, NegativeLogLikelihood
from manynets.metrics.collection import classification_metrics
from manynets.metrics.diversity import Disagreement, RatioErrors

__all__ = ["BrierScore", "NegativeLogLikelihood", "Disagreement", "RatioErrors", "classification_metrics"]

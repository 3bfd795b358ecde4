"""Calibration and ensemble-diversity metrics as torchmetrics Metrics, and the shared metric set."""

from manynets.metrics.calibration import BrierScore, CalibrationError, NegativeLogLikelihood
from manynets.metrics.collection import classification_metrics
from manynets.metrics.diversity import Disagreement, RatioErrors

__all__ = ["BrierScore", "CalibrationError", "NegativeLogLikelihood", "Disagreement", "RatioErrors", "classification_metrics"]

"""Calibration and ensemble-diversity metrics as torchmetrics Metrics."""

from manynets.metrics.calibration import BrierScore, NegativeLogLikelihood
from manynets.metrics.diversity import Disagreement, RatioErrors

__all__ = ["BrierScore", "NegativeLogLikelihood", "Disagreement", "RatioErrors"]

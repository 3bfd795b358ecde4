"""Reliability diagram: accuracy against confidence in equal-width bins (Guo et al., ICML 2017, §2, Fig. 1).

The binning is the one of the ECE that every method logs (``test/ece``, :mod:`manynets.metrics`,
torchmetrics' L1 calibration error with 15 bins): the confidence of an image is its max softmax
probability; bin m holds the confidences in [m/15, (m+1)/15), m = 0..14, and a confidence of exactly 1
falls in a bin [1, 1] of its own (torchmetrics' ``bucketize(..., right=True)``). Then

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|        (Guo et al., Eq. 3)

:class:`ReliabilityBins` accumulates per-bin counts and sums over batches (float64; summed over DDP
ranks by the caller), :meth:`~ReliabilityBins.rows` gives the table of ``reliability.csv`` (bin_lower,
bin_upper, confidence, accuracy, count, fraction; fractions), :func:`expected_calibration_error` the ECE
of such rows and :func:`plot_reliability` the diagram with the ECE in its title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from manynets.analysis.outputs import legend_outside, save_figure, titled, write_csv

NUM_BINS = 15
"""Equal-width bins of the ECE in :func:`manynets.metrics.classification_metrics`."""

COLUMNS = ("bin_lower", "bin_upper", "confidence", "accuracy", "count", "fraction")
UNITS = {"bin_lower": "fraction", "bin_upper": "fraction", "confidence": "fraction", "accuracy": "fraction",
         "count": "images", "fraction": "of images"}  # fmt: skip


class ReliabilityBins:
    """Per-bin image counts, summed confidences and correct predictions over batches of logits.

    Args:
        num_bins: equal-width bins on [0, 1] (15, as the logged ECE).
        device: where the sums live (the logits' device).
    """

    def __init__(self, num_bins: int = NUM_BINS, device: torch.device | str | None = None) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins = {num_bins}; expected >= 1 equal-width bins (15 as the logged ECE).")
        self.num_bins = num_bins
        # num_bins + 1 slots: the last holds confidences of exactly 1 (torchmetrics' binning)
        self.sums = torch.zeros(3, num_bins + 1, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``logits`` (B, C) (softmax applied here, as the metrics do), int labels (B,)."""
        probs = logits.detach().float().softmax(-1)
        confidence, predicted = probs.max(-1)
        if self.sums.device != confidence.device:
            self.sums = self.sums.to(confidence.device)
        boundaries = torch.linspace(0, 1, self.num_bins + 1, dtype=confidence.dtype, device=confidence.device)
        index = torch.bucketize(confidence, boundaries, right=True) - 1
        values = torch.stack([torch.ones_like(confidence), confidence, predicted.eq(labels).to(confidence.dtype)])
        self.sums.scatter_add_(1, index.expand(3, -1), values.double())

    def rows(self) -> list[dict[str, float]]:
        """One row per bin (the [1, 1] bin only when it holds images): bounds, mean confidence and accuracy
        of its images (empty bins: blank), image count and the share of all images."""
        count, confidence, correct = self.sums.cpu().tolist()
        total = sum(count)
        rows = []
        for m in range(self.num_bins + 1):
            if m == self.num_bins and count[m] == 0:
                continue
            lower, upper = (m / self.num_bins, (m + 1) / self.num_bins) if m < self.num_bins else (1.0, 1.0)
            rows.append({
                "bin_lower": lower,
                "bin_upper": upper,
                "confidence": confidence[m] / count[m] if count[m] else "",
                "accuracy": correct[m] / count[m] if count[m] else "",
                "count": int(count[m]),
                "fraction": count[m] / total if total else 0.0,
            })  # fmt: skip
        return rows


def expected_calibration_error(rows: Sequence[dict[str, Any]]) -> float:
    """ECE (Guo et al., Eq. 3) of reliability rows (as :meth:`ReliabilityBins.rows` or ``reliability.csv``)."""
    return sum(float(r["fraction"]) * abs(float(r["accuracy"]) - float(r["confidence"]))
               for r in rows if float(r["count"]) > 0)  # fmt: skip


def plot_reliability(rows: Sequence[dict[str, Any]], title: str):
    """The reliability diagram of ``rows``: accuracy per confidence bin (bars over the bin's width), the
    gap to each bin's mean confidence, the diagonal of perfect calibration and, below, the share of images
    per bin; the ECE goes into the title. Returns the Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    full = [r for r in rows if float(r["count"]) > 0]
    lower = [float(r["bin_lower"]) for r in full]
    width = [max(float(r["bin_upper"]) - float(r["bin_lower"]), 0.01) for r in full]
    accuracy = [float(r["accuracy"]) for r in full]
    confidence = [float(r["confidence"]) for r in full]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lower, accuracy, width, align="edge", color="C0", edgecolor="black", linewidth=0.5,
           label="accuracy of the bin")  # fmt: skip
    ax.bar(lower, [c - a for a, c in zip(accuracy, confidence)], width, bottom=accuracy, align="edge",
           color="C3", alpha=0.35, edgecolor="C3", hatch="//", label="gap to mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (fraction)")
    bins = sum(1 for r in rows if float(r["bin_upper"]) > float(r["bin_lower"]))
    ax.set_title(f"{title}\nECE = {expected_calibration_error(rows):.4f} ({bins} equal-width bins)")
    legend_outside(ax)
    hist.bar(lower, [float(r["fraction"]) for r in full], width, align="edge", color="C7", edgecolor="black",
             linewidth=0.5)  # fmt: skip
    hist.set_xlabel("confidence: max softmax probability (fraction)")
    hist.set_ylabel("images (fraction)")
    fig.tight_layout()
    return fig


def write_reliability(rows: Sequence[dict[str, Any]], directory: str | Path, trainer: Any = None, run: str = "",
                      name: str = "reliability", plot: bool = True) -> Path:  # fmt: skip
    """``<name>.csv`` (comma-separated, fractions, units in the header) and, with ``plot``, ``<name>.png``
    (:func:`plot_reliability`, also sent to the trainer's loggers). Returns the CSV's path."""
    path = write_csv(Path(directory) / f"{name}.csv", list(rows), UNITS, COLUMNS)
    if plot:
        fig = plot_reliability(rows, titled("reliability diagram, test set", run))
        save_figure(trainer, fig, directory, name)
    return path

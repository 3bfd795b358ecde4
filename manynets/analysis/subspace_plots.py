"""Figures of a subspace sweep (rows of :func:`manynets.analysis.subspace_sweep.run_sweep`, or of its
``subspace_sweep.csv`` read back with :func:`manynets.analysis.outputs.read_csv`).

Lines and curves: ``subspace_sweep`` (accuracy, NLL, ECE of the point α against α, with the
pair ensemble (α, 1 − α) against α for α ≤ 0.5) and ``subspace_diversity`` (TV distance
and feature cos² of the pair). Simplexes: ``subspace_simplex`` (vertices, centroid and
random points; ensemble accuracy against the number of random members, vertex ensemble).
Accuracies and ECE are fractions, NLL in nats. Every title names the run (``run``); legends sit
outside the axes. Saving and logging: :func:`manynets.analysis.outputs.save_figure`.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

from manynets.analysis.outputs import legend_outside, titled  # noqa: E402

METRIC_LABELS = {"acc": "accuracy (fraction)", "nll": "NLL (nats)", "ece": "ECE, 15 bins (fraction)"}


def sweep_figures(rows: list[dict], kind: str, run: str = "") -> dict[str, "plt.Figure"]:
    """name -> Figure of the sweep (laid out, not saved); ``run`` names the run in the titles."""
    rows = [{k: _value(v) for k, v in row.items()} for row in rows]
    figures = _line_figures(rows, kind, run) if kind in ("line", "curve") else _simplex_figures(rows, run)
    for fig in figures.values():
        fig.tight_layout()
    return figures


def _value(value):
    """Numbers of a row read back from CSV (strings) as floats; names stay strings, empty cells None."""
    if not isinstance(value, str):
        return value
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _line_figures(rows: list[dict], kind: str, run: str) -> dict:
    rows = [r for r in rows if r.get("alpha") is not None]
    alphas = [r["alpha"] for r in rows]
    half = [r for r in rows if r["alpha"] <= 0.5 + 1e-9]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("acc", "nll", "ece")):
        ax.plot(alphas, [r[metric] for r in rows], "o-", ms=3, label="single network at α")
        ax.plot([r["alpha"] for r in half], [r[f"pair_{metric}"] for r in half], "s--", ms=3,
                label="ensemble of α and 1 − α")  # fmt: skip
        ax.set_xlabel("α (position along the subspace)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
    legend_outside(axes[-1])
    fig.suptitle(titled(f"{kind}: test metrics along the subspace (BN recomputed per point)", run))
    div, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot([r["alpha"] for r in half], [r["pair_tv"] for r in half], "o-", ms=3)
    ax1.set_ylabel("TV distance of softmax outputs (fraction)")
    ax2.plot([r["alpha"] for r in half], [r["pair_feature_cos2"] for r in half], "o-", ms=3)
    ax2.set_ylabel("cos² of pooled features (unitless)")
    for ax in (ax1, ax2):
        ax.set_xlabel("α (pair α, 1 − α)")
        ax.grid(alpha=0.3)
    div.suptitle(titled(f"{kind}: diversity of the pair (α, 1 − α)", run))
    return {"subspace_sweep": fig, "subspace_diversity": div}


def _simplex_figures(rows: list[dict], run: str) -> dict:
    points = [r for r in rows if r.get("members") is None]
    ensembles = [r for r in rows if str(r["point"]).startswith("ensemble_random")]
    vertices = next(r for r in rows if r["point"] == "ensemble_vertices")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    colors = ["C0" if p["point"].startswith("vertex") else "C1" if p["point"] == "centroid" else "C2" for p in points]
    ax1.bar(range(len(points)), [p["acc"] for p in points], color=colors)
    ax1.set_xticks(range(len(points)), [p["point"] for p in points], rotation=60, fontsize=7)
    low = min(p["acc"] for p in points)
    ax1.set_ylim(max(0.0, low - 0.05), min(1.0, max(p["acc"] for p in points) + 0.02))
    ax1.set_xlabel("point of the simplex")
    ax1.set_ylabel(METRIC_LABELS["acc"])
    ax1.set_title("single points (BN recomputed per point)", fontsize=9)
    ax2.plot([1] + [e["members"] for e in ensembles],
             [next(p["acc"] for p in points if p["point"] == "random0")] + [e["acc"] for e in ensembles],
             "o-", label="ensemble of random points")  # fmt: skip
    ax2.axhline(vertices["acc"], color="C0", ls="--", label=f"ensemble of the {int(vertices['members'])} vertices")
    ax2.axhline(next(p["acc"] for p in points if p["point"] == "centroid"), color="C1", ls=":", label="centroid")
    ax2.set_xlabel("ensemble members (networks)")
    ax2.set_ylabel(METRIC_LABELS["acc"])
    ax2.set_title("ensembles of points", fontsize=9)
    legend_outside(ax2, fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(titled("simplex: test accuracy of its points and ensembles", run))
    return {"subspace_simplex": fig}

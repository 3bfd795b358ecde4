"""Evaluation sweep of a trained subspace (spec superposition_mixmo_subspaces §3.4): points along a line
or curve, pair ensembles, diversity, and simplex ensembles (the rows of ``subspace_sweep.csv``).

Lines and curves, for α₀ in {0, 0.05, ..., 1} (``num_alphas`` = 21):

- ``acc / nll / ece / brier`` of the single point α₀;
- ``pair_*``: the ensemble of α₀ and 1 − α₀ by mean logits (α₀ = 0 is the endpoint ensemble,
  0.5 the midpoint alone), as in the official ``eval_one_dim_subspaces``;
- ``pair_tv``: total-variation distance ½Σ|p − q| between the pair's softmax outputs (mean over samples);
- ``pair_feature_cos2``: squared cosine between the pair's pooled features (mean over samples).

Simplexes: the k vertices, the centroid and ``num_random_points`` Dirichlet(1) points; the
ensemble of the vertices and the ensembles of the first m random points (m = 2..R), by mean logits.

Every evaluated point gets its own BN statistics, recomputed over the training data (official
behaviour, spec §3.3), with each training batch loaded once for all points
(:func:`~manynets.analysis.bn_recompute.collect_bn_statistics`: one point per forward on a CPU, packed
points on CUDA), and the test data is also read once (:func:`~manynets.layers.subspace_bn.packed_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manynets.analysis.bn_recompute import collect_bn_statistics, default_chunk_size
from manynets.analysis.passes import device_of, each_batch
from manynets.analysis.progress import tracked
from manynets.layers.subspace import num_parameter_sets, subspace_coefficients
from manynets.layers.subspace_bn import check_packed, packed_logits
from manynets.metrics import classification_metrics

UNITS = {m: u for k, u in (("acc", "fraction"), ("nll", "nats"), ("ece", "fraction"), ("pair_tv", "fraction"))
         for m in (k, f"pair_{k}")}  # fmt: skip
"""Units of the columns of ``subspace_sweep.csv`` (Brier and cos² are unitless scores)."""

_METRICS = ("acc", "nll", "ece", "brier")


def sweep_points(kind: str, num_vertices: int | None, num_alphas: int = 21, num_random_points: int = 8,
                 seed: int = 0) -> tuple[list[str], torch.Tensor]:  # fmt: skip
    """Names and coefficients (P, S) of the evaluated points."""
    if kind in ("line", "curve"):
        if num_alphas < 2:
            raise ValueError(f"SubspaceSweep num_alphas={num_alphas}; expected >= 2 (0 and 1 included).")
        alphas = torch.linspace(0, 1, num_alphas)
        return [f"{a:.4g}" for a in alphas.tolist()], subspace_coefficients(kind, alphas)
    k = num_parameter_sets(kind, num_vertices)
    if num_random_points < 2:
        raise ValueError(f"SubspaceSweep num_random_points={num_random_points}; expected >= 2 (random ensembles).")
    g = torch.Generator().manual_seed(seed)
    random = torch.empty(num_random_points, k).exponential_(generator=g)
    points = torch.cat([torch.eye(k), torch.full((1, k), 1.0 / k), random / random.sum(-1, keepdim=True)])
    names = [f"vertex{i}" for i in range(k)] + ["centroid"] + [f"random{i}" for i in range(num_random_points)]
    return names, points


class _Accumulator:
    """Streaming metrics of the sweep (one metric collection per evaluated point or ensemble)."""

    def __init__(self, num_classes: int, device) -> None:
        self.num_classes, self.device = num_classes, device
        self.collections: dict[str, object] = {}
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, key: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if key not in self.collections:
            self.collections[key] = classification_metrics(self.num_classes, "").to(self.device)
        self.collections[key].update(logits.float(), labels)

    def add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + values.double().sum().item()

    def result(self, key: str) -> dict[str, float]:
        return {k: v.item() for k, v in self.collections[key].compute().items()}


@torch.no_grad()
def run_sweep(
    network: torch.nn.Module,
    kind: str,
    num_vertices: int | None,
    num_classes: int,
    train_batches,
    test_batches,
    num_alphas: int = 21,
    num_random_points: int = 8,
    points_per_pass: int | None = None,
    bn_batches: int | None = None,
    recompute_bn: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Evaluate the subspace ``network``; returns one row (dict) per point / ensemble (see module doc)."""
    names, coefficients = sweep_points(kind, num_vertices, num_alphas, num_random_points, seed)
    device = device_of(network)
    coefficients = coefficients.to(device)
    p = len(names)
    if points_per_pass is None:  # grouped convs pay on a GPU; on a CPU separate convs are faster
        points_per_pass = default_chunk_size(device, p)
    stats = None
    if recompute_bn:
        total = _length(train_batches)
        total = bn_batches if total is None else min(total, bn_batches or total)
        train_batches = tracked(train_batches, "subspace sweep, BN statistics", total)
        stats = collect_bn_statistics(network, train_batches, coefficients, points_per_pass, bn_batches)
    chunks = [(lo, min(lo + points_per_pass, p)) for lo in range(0, p, points_per_pass)]
    acc = _Accumulator(num_classes, device)
    checked = [points_per_pass == 1]

    def score(x: torch.Tensor, y: torch.Tensor) -> None:
        if not checked[0]:  # packing must not change the result (see check_packed)
            check_packed(network, x[:8], coefficients[[0, p - 1]])
            checked[0] = True
        logits, features = [], []
        for lo, hi in chunks:
            chunk_stats = None if stats is None else {n: (m[lo:hi], v[lo:hi]) for n, (m, v) in stats.items()}
            lg, ft = packed_logits(network, x, coefficients[lo:hi], chunk_stats)
            logits.append(lg)
            features.append(ft)
        logits, features = torch.cat(logits), torch.cat(features)
        for i, name in enumerate(names):
            acc.update(name, logits[i], y)
        acc.count += y.numel()
        if kind in ("line", "curve"):
            probs = logits.float().softmax(-1)
            for i in range(p):
                j = p - 1 - i  # α₁ = 1 − α₀ on the symmetric grid
                acc.update(f"pair{i}", (logits[i] + logits[j]) / 2, y)
                acc.add(f"tv{i}", 0.5 * (probs[i] - probs[j]).abs().sum(-1))
                acc.add(f"cos2_{i}", F.cosine_similarity(features[i].float(), features[j].float(), dim=-1).pow(2))
        else:
            k = num_parameter_sets(kind, num_vertices)
            acc.update("ensemble_vertices", logits[:k].mean(0), y)
            random = logits[k + 1 :]
            for m in range(2, len(random) + 1):
                acc.update(f"ensemble_random{m}", random[:m].mean(0), y)

    each_batch(network, tracked(test_batches, "subspace sweep, test set"), score, device)
    rows = []
    for i, name in enumerate(names):
        row = {"point": name, **acc.result(name)}
        if kind in ("line", "curve"):
            row["alpha"] = float(name)
            row.update({f"pair_{k}": v for k, v in acc.result(f"pair{i}").items()})
            row["pair_tv"] = acc.sums[f"tv{i}"] / acc.count
            row["pair_feature_cos2"] = acc.sums[f"cos2_{i}"] / acc.count
        else:
            row["coefficients"] = " ".join(f"{c:.4f}" for c in coefficients[i].tolist())
        rows.append(row)
    if kind == "simplex":
        rows.append({"point": "ensemble_vertices", "members": num_parameter_sets(kind, num_vertices),
                     **acc.result("ensemble_vertices")})  # fmt: skip
        for m in range(2, num_random_points + 1):
            rows.append({"point": f"ensemble_random{m}", "members": m, **acc.result(f"ensemble_random{m}")})
    return rows


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def summary(rows: list[dict], kind: str) -> dict[str, float]:
    """Headline numbers for the logger: midpoint / endpoints / pair ensembles or simplex ensembles."""
    out = {}
    if kind in ("line", "curve"):
        by_alpha = {r["alpha"]: r for r in rows}
        for label, alpha in (("endpoint0", 0.0), ("endpoint1", 1.0), ("midpoint", 0.5)):
            if alpha in by_alpha:
                out.update({f"sweep/{label}/{m}": by_alpha[alpha][m] for m in _METRICS})
        out.update({f"sweep/endpoint_ensemble/{m}": by_alpha[0.0][f"pair_{m}"] for m in _METRICS})
        best = max(rows, key=lambda r: r["pair_acc"])
        out["sweep/best_pair/acc"], out["sweep/best_pair/alpha0"] = best["pair_acc"], min(best["alpha"], 1 - best["alpha"])
        out["sweep/endpoint_ensemble/tv"] = by_alpha[0.0]["pair_tv"]
        out["sweep/endpoint_ensemble/feature_cos2"] = by_alpha[0.0]["pair_feature_cos2"]
    else:
        for r in rows:
            if r["point"] in ("centroid", "ensemble_vertices") or r["point"].startswith("ensemble_random"):
                out.update({f"sweep/{r['point']}/{m}": r[m] for m in _METRICS})
    return out



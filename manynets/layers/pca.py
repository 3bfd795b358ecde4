"""PCA projection of layer outputs and the delta sweep (spec pinet_saturation §2.7-2.8; PHD-LAB
``phd_lab/experiments/utils/pca_layers.py`` and ``infer_with_altering_delta.py``; Richter et al.,
arXiv 2006.08679: "a layer's output can be restricted to its delta-eigenspace without loss").

:class:`PCAProjection` in ``fit`` state is the identity and accumulates the float64 covariance of
what passes through (conv maps channel-wise, optionally nearest-resized first, §2.1). :meth:`finalize`
eigen-decomposes it and keeps the top ``k`` eigenvectors ``V_k`` with the PCA layer's **own** count
(§2.8: delve's #{p_k < delta}, at least 1, plus one when ``delta - p_k > 0.02``, which can differ by
one from delve's ID); afterwards the output is ``x P`` with ``P = V_k V_k^T`` (conv: a 1x1 conv with
weight P). With ``centering`` the covariance is centred and the projection is ``(x - mu) P + mu``
(the official layer never fills its ``mean`` buffer, so it projects ``x`` uncentred; pass
``centering=False`` for that). ``delta > 1`` keeps every direction: an exact no-op.
:meth:`use_random_basis` swaps ``V_k`` for a random orthonormal basis of the same dimension
(PHD-LAB's ``project-random`` control).

:func:`insert_pca_layers` attaches projections to chosen layers of any backbone with forward hooks
(nothing in the network changes); :func:`delta_sweep` fits them on training data and evaluates the
test accuracy, summed dimension and mean saturation for each delta of :data:`SWEEP_DELTAS` (CSV).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from manynets.layers.covariance import StreamingCovariance, count_from_eigenvalues, eigen_descending, layer_samples

SWEEP_DELTAS: tuple[float, ...] = (
    *[round(0.90 + 0.01 * i, 2) for i in range(10)],
    0.992, 0.994, 0.996, 0.998, 0.999,
    *[round(0.9991 + 0.0001 * i, 4) for i in range(9)],
    3.0,
)  # fmt: skip
"""The deltas of PHD-LAB's ``infer_with_altering_delta.py`` (its duplicated 0.999 is listed once)."""


class PCAProjection(nn.Module):
    """Projection of a layer output onto its top principal directions (spec §2.8).

    Args:
        num_features: width D (channels of a conv map, features of a linear output).
        delta: explained-variance threshold; > 1 keeps all directions (identity).
        centering: centre the covariance and the projection (see module doc).
        downsampling: conv maps larger than d x d are resized to d x d (nearest) for the covariance only.
    """

    def __init__(self, num_features: int, delta: float = 0.99, centering: bool = True, downsampling: int | None = None):
        super().__init__()
        self.num_features, self.delta, self.centering, self.downsampling = num_features, delta, centering, downsampling
        self.stats = StreamingCovariance(num_features)
        self.register_buffer("eigenvectors", torch.empty(0))
        self.register_buffer("eigenvalues", torch.empty(0))
        self.register_buffer("mean", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("projection", torch.empty(0))
        self.k = num_features
        self.fitting = True

    def accumulate(self, x: torch.Tensor) -> None:
        self.stats.update(layer_samples(x.detach(), "channelwise", self.downsampling))

    def finalize(self) -> None:
        """Eigen-decompose the accumulated covariance, pick ``k`` for ``delta``, reset the sums."""
        self.stats.all_reduce()
        if self.stats.n == 0:
            raise RuntimeError("PCAProjection.finalize: no sample was accumulated; run training data through first")
        cov = self.stats.covariance() if self.centering else self.stats.second_moment()
        self.eigenvalues, self.eigenvectors = eigen_descending(cov)
        self.mean = self.stats.mean() if self.centering else torch.zeros_like(self.stats.mean())
        self.stats.reset()
        self.fitting = False
        self.set_delta(self.delta)

    def set_delta(self, delta: float) -> None:
        """Re-pick ``k`` and ``P`` for another threshold (no new pass over the data)."""
        if self.eigenvectors.numel() == 0:
            raise RuntimeError("PCAProjection.set_delta before finalize(): no eigen-decomposition yet")
        self.delta = delta
        self.k = count_from_eigenvalues(self.eigenvalues, delta, "pca_layer")
        basis = self.eigenvectors[:, : self.k]
        self.projection = basis @ basis.T

    def use_random_basis(self, generator: torch.Generator | None = None) -> None:
        """Random orthonormal basis of the same dimension ``k`` instead of the eigenvectors (control)."""
        d = self.num_features
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
        basis = q[:, : self.k].to(self.projection.device)
        self.projection = basis @ basis.T

    @property
    def saturation(self) -> float:
        return self.k / self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitting:
            self.accumulate(x)
            return x
        if self.k == self.num_features and self.delta > 1:
            return x  # all directions kept: exact identity
        p = self.projection.to(x.dtype)
        mu = self.mean.to(x.dtype)
        if x.dim() == 4:
            shift = mu.view(1, -1, 1, 1)
            return F.conv2d(x - shift, p.T[:, :, None, None]) + shift  # out_c = sum_in P[in, out] x_in
        return (x - mu) @ p + mu


class PCAHooks:
    """Projections attached by forward hooks to named layers of a network; :meth:`remove` detaches them."""

    def __init__(self, layers: dict[str, PCAProjection], handles: list) -> None:
        self.layers, self.handles = layers, handles

    def fitting(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.fitting = on

    def finalize(self) -> None:
        for layer in self.layers.values():
            layer.finalize()

    def set_delta(self, delta: float) -> None:
        for layer in self.layers.values():
            layer.set_delta(delta)

    def use_random_basis(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.use_random_basis(g)

    def summary(self) -> dict[str, float]:
        dims = [layer.k for layer in self.layers.values()]
        widths = [layer.num_features for layer in self.layers.values()]
        sats = [layer.saturation for layer in self.layers.values()]
        return {"sum_id": sum(dims), "sum_width": sum(widths), "mean_saturation": sum(sats) / len(sats)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def insert_pca_layers(
    network: nn.Module,
    layers: str | None = None,
    types: Iterable[str] = ("Conv2d", "Linear"),
    delta: float = 0.99,
    centering: bool = True,
    downsampling: int | None = None,
    exclude_last: bool = True,
) -> PCAHooks:
    """Attach a :class:`PCAProjection` after every chosen layer (forward hooks replace the output).

    Layers are chosen as in :func:`manynets.callbacks.saturation.select_layers`; ``exclude_last``
    leaves the final layer (the logits) alone, as PHD-LAB's PCA models do.
    """
    from manynets.callbacks.saturation import layer_width, select_layers

    chosen = select_layers(network, layers, tuple(types))
    if exclude_last and len(chosen) > 1:
        chosen.pop(list(chosen)[-1])
    device = next(network.parameters()).device
    projections, handles = {}, []
    for name, module in chosen.items():
        pca = PCAProjection(layer_width(module), delta, centering, downsampling).to(device)
        projections[name] = pca
        handles.append(module.register_forward_hook(lambda m, i, out, pca=pca: pca(out)))
    return PCAHooks(projections, handles)


@torch.no_grad()
def evaluate(network: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``network`` in eval mode over ``loader``."""
    network.eval()
    correct, loss, n = 0, 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = network(images)
        correct += int((logits.argmax(-1) == labels).sum())
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        n += len(labels)
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def delta_sweep(
    network: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    csv_path: str | Path | None = None,
    deltas: Iterable[float] = SWEEP_DELTAS,
    layers: str | None = None,
    types: Iterable[str] = ("Conv2d", "Linear"),
    centering: bool = True,
    downsampling: int | None = None,
    random_control: bool = False,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Spec §2.7 ``project`` mode on a trained network.

    The covariances are fitted on ``train_loader`` with the network in eval mode (BN running
    statistics), then for every delta the test accuracy, loss, summed dimension (PCA-layer count),
    summed width and mean saturation are recorded; ``random_control`` adds the same with a random
    orthonormal subspace of equal dimension per layer. Rows are written to ``csv_path`` if given.
    """
    device = next(network.parameters()).device
    hooks = insert_pca_layers(network, layers, types, 0.99, centering, downsampling)
    rows = []
    try:
        network.eval()
        for images, _ in train_loader:
            network(images.to(device))
        hooks.finalize()
        for delta in deltas:
            hooks.set_delta(delta)
            acc, loss = evaluate(network, test_loader, device)
            row = {"delta": delta, "accuracy": acc, "loss": loss, **hooks.summary()}
            if random_control:
                hooks.use_random_basis(seed)
                row["random_accuracy"], row["random_loss"] = evaluate(network, test_loader, device)
            rows.append(row)
    finally:
        hooks.remove()
    if csv_path is not None:
        path = Path(csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows

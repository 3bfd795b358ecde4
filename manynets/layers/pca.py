"""PCA projection of a layer output (spec pinet_saturation §2.7-2.8; PHD-LAB
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

Attaching projections to layers of a trained network and the delta sweep over data are analysis
(:mod:`manynets.analysis.pca`); this module is the math of one projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manynets.layers.covariance import StreamingCovariance, count_from_eigenvalues, eigen_descending, layer_samples


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

"""Norms of π-gradients (Yang, Santacroce & Hu, ICLR 2022): the arc-cosine kernel J1 and ``ABnorm``.

Spec pinet_saturation §1.6 (official ``santacml/pilim`` ``pilimit_lib/inf/utils.py``):
``J1(c) = 2 phi(c) = [sqrt(1 - c^2) + (pi - arccos c) c] / pi`` (``VReLUmatrix``), with ``phi`` the
ReLU expectation of the π-layer kernel. ``phi``, ``phi_prime`` and ``psi_numerator`` live with the kernel
in ``manynets.cuda_ops.pi_math`` and are re-exported here. As there, cosines are clamped to [-1, 1] and
the square-root argument to >= 1e-20, so ``J1(1) = 1 + 3e-11`` (test with a tolerance).
"""

from __future__ import annotations

import math

import torch

from manynets.cuda_ops.pi_math import phi, phi_prime, psi_numerator, sqrt_one_minus_square

__all__ = ["ab_norm", "j1", "phi", "phi_prime", "psi_numerator", "relu_covariance"]


def j1(c: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 1, normalised so that J1(1) = 1 (spec §1.6): 2 phi(c)."""
    c = c.clamp(-1.0, 1.0)
    return (sqrt_one_minus_square(c) + (math.pi - torch.acos(c)) * c) / math.pi


def relu_covariance(dB: torch.Tensor) -> torch.Tensor:
    """V = E[relu(u) relu(u)^T] for u ~ N(0, dB dB^T): 1/2 d_m d_m' J1(cos_mm') (spec §1.6, ``VReLUmatrix``)."""
    d = dB.norm(dim=1)
    unit = dB / d.clamp_min(1e-30)[:, None]
    return 0.5 * d[:, None] * d[None, :] * j1(unit @ unit.T)


def ab_norm(dA: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
    """Norm of an appended block of pi-gradient rows (spec §1.6, official ``ABnorm``).

    ``sqrt(sum_{m,m'} <dA_m, dA_m'> V_mm')`` with V of :func:`relu_covariance`; one row with a unit
    ``dB`` gives ``||dA|| / sqrt(2)``. Computed in at least fp32.
    """
    dtype = torch.promote_types(dA.dtype, torch.float32)
    dA, dB = dA.to(dtype), dB.to(dtype)
    return ((dA @ dA.T) * relu_covariance(dB)).sum().clamp_min(0).sqrt()

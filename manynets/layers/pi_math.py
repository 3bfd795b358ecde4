"""Closed forms of the π-limit (Yang, Santacroce & Hu, ICLR 2022): ReLU arc-cosine expectations.

Spec pinet_saturation §1.3, §1.4, §1.6 (official ``santacml/pilim`` ``pilimit_lib/inf/math.py``,
``pilimit_lib/inf/utils.py``). For unit-variance Gaussians z1, z2 with correlation c:

- ``phi(c)  = E[relu(z1) relu(z2)] = [sqrt(1 - c^2) + c (pi - arccos c)] / (2 pi)``   (official ``F00ReLUsqrt``)
- ``phi_prime(c) = d phi / dc = arccos(-c) / (2 pi)``                                 (``F11``)
- ``psi_numerator(c) = phi(c) - c phi'(c) = sqrt(1 - c^2) / (2 pi)``; the spec's psi is this / s (``F02``)
- ``J1(c) = 2 phi(c) = [sqrt(1 - c^2) + (pi - arccos c) c] / pi``                      (``VReLUmatrix``)

Numerics as in the official code: cosines are clamped to [-1, 1] and the argument of the square
root to >= 1e-20, so ``phi(1) = 1/2 + 1.6e-11`` and ``J1(1) = 1 + 3e-11`` (not exact; test with a tolerance).
"""

from __future__ import annotations

import math

import torch

SQRT_EPS = 1e-20
"""Lower clamp of the square-root argument (official eps)."""


def _sqrt1m(c: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((1 - c * c).clamp_min(SQRT_EPS))


def phi(c: torch.Tensor) -> torch.Tensor:
    """E[relu(z1) relu(z2)] for standard Gaussians with correlation ``c`` (spec §1.3)."""
    c = c.clamp(-1.0, 1.0)
    return (_sqrt1m(c) + c * (math.pi - torch.acos(c))) / (2 * math.pi)


def phi_prime(c: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`phi`: arccos(-c) / (2 pi) (spec §1.4)."""
    return torch.acos(-c.clamp(-1.0, 1.0)) / (2 * math.pi)


def psi_numerator(c: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - c^2) / (2 pi) = phi(c) - c phi'(c); the radial part of the backward (spec §1.4, psi = this / s)."""
    return _sqrt1m(c.clamp(-1.0, 1.0)) / (2 * math.pi)


def j1(c: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 1, normalised so that J1(1) = 1 (spec §1.6): 2 phi(c)."""
    c = c.clamp(-1.0, 1.0)
    return (_sqrt1m(c) + (math.pi - torch.acos(c)) * c) / math.pi


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

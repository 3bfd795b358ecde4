"""Closed forms the π-layer kernel needs (Yang, Santacroce & Hu, ICLR 2022): ReLU arc-cosine expectations.

Spec pinet_saturation §1.3, §1.4 (official ``santacml/pilim`` ``pilimit_lib/inf/math.py``). For
unit-variance Gaussians z1, z2 with correlation c:

- ``phi(c)  = E[relu(z1) relu(z2)] = [sqrt(1 - c^2) + c (pi - arccos c)] / (2 pi)``   (official ``F00ReLUsqrt``)
- ``phi_prime(c) = d phi / dc = arccos(-c) / (2 pi)``                                 (``F11``)
- ``psi_numerator(c) = phi(c) - c phi'(c) = sqrt(1 - c^2) / (2 pi)``; the spec's psi is this / s (``F02``)

Numerics as in the official code: cosines are clamped to [-1, 1] and the argument of the square root
to >= 1e-20 (:func:`sqrt_one_minus_square`), so ``phi(1) = 1/2 + 1.6e-11`` (test with a tolerance).
The clipping norms built on the same forms live in ``manynets.layers.pi_math``.
"""

from __future__ import annotations

import math

import torch

SQRT_EPS = 1e-20
"""Lower clamp of the square-root argument (official eps)."""


def sqrt_one_minus_square(c: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(1 - c^2, 1e-20))``."""
    return torch.sqrt((1 - c * c).clamp_min(SQRT_EPS))


def phi(c: torch.Tensor) -> torch.Tensor:
    """E[relu(z1) relu(z2)] for standard Gaussians with correlation ``c`` (spec §1.3)."""
    c = c.clamp(-1.0, 1.0)
    return (sqrt_one_minus_square(c) + c * (math.pi - torch.acos(c))) / (2 * math.pi)


def phi_prime(c: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`phi`: arccos(-c) / (2 pi) (spec §1.4)."""
    return torch.acos(-c.clamp(-1.0, 1.0)) / (2 * math.pi)


def psi_numerator(c: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - c^2) / (2 pi) = phi(c) - c phi'(c); the radial part of the backward (spec §1.4, psi = this / s)."""
    return sqrt_one_minus_square(c.clamp(-1.0, 1.0)) / (2 * math.pi)

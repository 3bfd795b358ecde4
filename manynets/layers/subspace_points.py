"""Points of a subspace: the coefficients of the parameter sets at a point, and random points (spec §3.1-3.2).

Wortsman et al., "Learning Neural Network Subspaces", ICML 2021 (official ``apple/learning-subspaces``,
``models/modules.py``, ``trainers/train_one_dim_subspaces.py``, ``trainers/train_simplexes.py``). A
subspace layer (:mod:`manynets.layers.subspace`) computes with θ = Σ_s c_s θ_s; this module gives c:

- line (S = 2):    θ(α) = (1−α)θ₀ + αθ₁
- curve (S = 3):   θ(α) = (1−α)²θ₀ + α²θ₁ + 2α(1−α)θ₂   (θ₁ = ``weight1`` the far endpoint,
  θ₂ = ``weight2`` the control point, as in the official code)
- simplex (S = k, 2 ≤ k ≤ 9): θ(t) = Σ_i t_i θ_i with t ≥ 0, Σ t = 1 (barycentric, t₀ = 1 − Σ_{i≥1} t_i)

Coefficients come in the requested ``dtype`` (a float64 model's point is computed in float64).
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["line", "curve", "simplex"]
KINDS = ("line", "curve", "simplex")


def num_parameter_sets(kind: str, num_vertices: int | None = None) -> int:
    """S: 2 for a line, 3 for a curve (two endpoints + control point), k for a k-vertex simplex."""
    if kind == "line":
        return 2
    if kind == "curve":
        return 3
    if kind == "simplex":
        if num_vertices is None or not 2 <= int(num_vertices) <= 9:
            raise ValueError(
                f"simplex num_vertices={num_vertices}; expected an int in 2..9 (official SimplexConv2..9)."
            )
        return int(num_vertices)
    raise ValueError(f"subspace kind={kind!r}; expected one of {KINDS}.")


def _dtype(point, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if isinstance(point, torch.Tensor) and point.is_floating_point():
        return point.dtype
    return torch.get_default_dtype()


def subspace_coefficients(
    kind: str, point, num_vertices: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Coefficients c (..., S) of the parameter sets at ``point`` (spec §3.1).

    ``point``: α in [0, 1] (float or tensor (...)) for a line or curve; barycentric t (..., k) for a
    simplex (non-negative, summing to 1). The curve's sets are ordered θ₀, θ₁ (far end), θ₂ (control).
    ``dtype``: of the result; default the point's (a floating tensor) or torch's default float type.
    """
    dtype = _dtype(point, dtype)
    if kind in ("line", "curve"):
        a = torch.as_tensor(point, dtype=dtype)
        if a.numel() and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{kind} point alpha={point}; expected values in [0, 1].")
        return _curve_coefficients(kind, a)
    k = num_parameter_sets(kind, num_vertices)
    t = torch.as_tensor(point, dtype=dtype)
    if t.shape[-1:] != (k,):
        raise ValueError(f"simplex point of shape {tuple(t.shape)}; expected (..., {k}) barycentric coordinates.")
    if t.min() < -1e-6 or not torch.allclose(t.sum(-1), torch.ones((), dtype=dtype), atol=1e-4):
        raise ValueError(f"simplex point {point}; expected non-negative coordinates summing to 1.")
    return t


def _curve_coefficients(kind: str, a: torch.Tensor) -> torch.Tensor:
    if kind == "line":
        return torch.stack([1 - a, a], -1)
    return torch.stack([(1 - a) ** 2, a**2, 2 * a * (1 - a)], -1)


def midpoint(kind: str, num_vertices: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Coefficients of the evaluation point: α = 0.5 (line, curve) or the centroid (simplex)."""
    if kind == "simplex":
        k = num_parameter_sets(kind, num_vertices)
        return torch.full((k,), 1.0 / k, dtype=dtype)
    return subspace_coefficients(kind, 0.5, dtype=dtype)


def sample_coefficients(
    kind: str,
    num_vertices: int | None,
    n: int,
    device=None,
    *,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n random points (spec §3.2): α ~ U[0, 1] (line, curve) or t ~ Dirichlet(1) (simplex); (n, S).

    ``dtype`` defaults to torch's default float type; ``generator`` (on ``device``) gives fixed draws.
    """
    if kind == "simplex":
        k = num_parameter_sets(kind, num_vertices)
        e = torch.empty(n, k, device=device, dtype=dtype).exponential_(generator=generator)
        return e / e.sum(-1, keepdim=True)
    num_parameter_sets(kind, num_vertices)  # validates kind
    alpha = torch.rand(n, device=device, dtype=dtype, generator=generator)
    return _curve_coefficients(kind, alpha)  # no range check: no device sync per step

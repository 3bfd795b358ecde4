"""Binding, bundling and learned unbinding of MIMOConv (Menet et al., NeurIPS 2023; spec §1.1-1.3).

A superposition of capacity N has N slots, each with its own key. A call with n | N images
repeats them r = N/n times: slot j holds image ``j mod n`` (spec §1.1 step 3). Since binding is
linear, binding and summing the repeated slots equals binding each image once with the sum of
its keys, ``sum_j x_(j mod n) (*) k_j = sum_i x_i (*) (sum_(j = i mod n) k_j)``
(spec §1.5): :func:`repeated_slot_sum` folds the keys, and only n images are bound.

- :class:`HRRBinding`: circular convolution along channels with a key per slot (spec §1.2),
  computed by FFT (:func:`manynets.cuda_ops.binding.hrr_bind_bundle`).
- :class:`MBATBinding`: a learned C x C matrix per slot (the official grouped 1x1 conv).
- :class:`SumBinding`: binding ``none``, a plain sum of the slots.
- :class:`LearnedUnbinding`: after global pooling, Linear(D, N·D) + ReLU, then the r copies of
  each image are averaged (spec §1.1 step 7). MIMOConv never unbinds by correlation.
- :func:`bind_regularization`: R_bind, pushes the HRR keys to be orthonormal (spec §1.3).

Every binding of n slots is linear in the stacked slots: ``s = [M_1 ... M_n] [x_1; ...; x_n]`` at every
pixel, with M_i the circulant matrix of the folded key (HRR), the folded matrix (MBAT) or r·I (sum).
:meth:`_Binding.stacked_matrix` returns that (C, n·C) matrix, so a group's n slots, stored one after
the other as (n·C, H·W), are bound and bundled by one GEMM without a copy (MBAT binds this way;
HRR through :func:`manynets.cuda_ops.binding.hrr_bind_bundle`, which picks GEMM or FFT).

Every binding takes the stem output of a group either as maps (G, n, C, H, W) (convolutional stems, the
paper's case: the binding acts on the channels of every pixel) or as vectors (G, n, C) (a stem that
ends in a Linear layer, e.g. an MLP: HRR is the circular convolution of the C features with the key,
MBAT a C x C matrix per slot). A vector is the map case with H = W = 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from manynets.cuda_ops.binding import MATMUL_MAX_CHANNELS, circulant, hrr_bind_bundle

__all__ = [
    "HRRBinding",
    "LearnedUnbinding",
    "MBATBinding",
    "SumBinding",
    "bind_regularization",
    "bundle",
    "repeated_slot_sum",
]


def check_slots(n: int, capacity: int) -> int:
    """r = capacity / n; raises unless n divides the capacity."""
    if not isinstance(n, int) or n < 1 or capacity % n:
        raise ValueError(
            f"{n} images per superposition does not divide the capacity N={capacity}; "
            f"use one of {[d for d in range(1, capacity + 1) if capacity % d == 0]}."
        )
    return capacity // n


def repeated_slot_sum(per_slot: Tensor, n: int) -> Tensor:
    """(N, ...) per-slot parameters -> (n, ...): entry i sums the slots j with j mod n = i."""
    capacity = per_slot.shape[0]
    r = check_slots(n, capacity)
    return per_slot.reshape(r, n, *per_slot.shape[1:]).sum(0)


def bundle(bound: Tensor) -> Tensor:
    """Bundling: the sum of the bound slots, (G, N, C, H, W) -> (G, C, H, W) or (G, N, C) -> (G, C)."""
    return bound.sum(1)


class _Binding(nn.Module):
    """Binds n images of each group into one superposed input of the body:
    maps (G, n, C, H, W) -> (G, C, H, W), or vectors (G, n, C) -> (G, C)."""

    def __init__(self, num_slots: int, channels: int) -> None:
        super().__init__()
        if num_slots < 1 or channels < 1:
            raise ValueError(f"binding needs num_slots >= 1 and channels >= 1, got {num_slots} and {channels}.")
        self.num_slots, self.channels = num_slots, channels

    def _check(self, x: Tensor) -> int:
        if x.dim() not in (3, 5) or x.shape[2] != self.channels:
            raise ValueError(
                f"{type(self).__name__} expects maps (groups, n, {self.channels}, H, W) or vectors "
                f"(groups, n, {self.channels}), got {tuple(x.shape)}."
            )
        return check_slots(x.shape[1], self.num_slots)

    def regularization(self) -> Tensor:
        """Binding regularizer (R_bind for HRR, 0 otherwise)."""
        return next(iter(self.parameters()), torch.zeros(())).new_zeros(())

    def stacked_matrix(self, n: int) -> Tensor | None:
        """(C, n·C) ``[M_1 ... M_n]``: ``s = sum_i M_i x_i`` binds and bundles n slots (repeated slots folded);
        None where another formulation is cheaper (HRR from ``MATMUL_MAX_CHANNELS`` channels: FFT)."""
        raise NotImplementedError

    def bind_stacked(self, x: Tensor, n: int, out: Tensor | None = None) -> Tensor:
        """Bind groups whose n slots are stored one after the other: x (G, n·C, P) -> (G, C, P), written
        into ``out`` if given (one GEMM with :meth:`stacked_matrix`; ``out`` only without autograd)."""
        matrix = self.stacked_matrix(n)
        if matrix is None:
            bound = self(x.view(x.shape[0], n, self.channels, x.shape[2], 1))[..., 0]
            return bound if out is None else out.copy_(bound)
        return torch.matmul(matrix.to(x.device, x.dtype), x, out=out)


class SumBinding(_Binding):
    """Binding ``none``: the slots are summed unchanged (repeated slots count r times)."""

    def forward(self, x: Tensor) -> Tensor:
        r = self._check(x)
        out = bundle(x)
        return out * r if r > 1 else out

    def stacked_matrix(self, n: int) -> Tensor:
        r = check_slots(n, self.num_slots)
        return torch.eye(self.channels).mul_(r).repeat(1, n)

    def bind_stacked(self, x: Tensor, n: int, out: Tensor | None = None) -> Tensor:
        """The sum of the n slots times r (no GEMM with the identity blocks of :meth:`stacked_matrix`)."""
        r = check_slots(n, self.num_slots)
        out = torch.sum(x.view(x.shape[0], n, self.channels, x.shape[2]), 1, out=out)
        return out.mul_(r) if r > 1 else out


class HRRBinding(_Binding):
    """HRR binding: slot j is circularly convolved along channels with key k_j at every pixel (or, for
    vector features, along the feature axis).

    Keys (N, C) are in convolution form (``out = x (*) k``); the official Conv1d weight is
    ``key_to_conv1d_weight(keys)``. Init U(±1/sqrt(C)), PyTorch's Conv1d default that the official
    keys keep (spec §1.2). ``trainable=False`` freezes them (official ``-v``).
    """

    def __init__(self, num_slots: int, channels: int, trainable: bool = True) -> None:
        super().__init__(num_slots, channels)
        bound = 1.0 / math.sqrt(channels)
        self.keys = nn.Parameter(torch.empty(num_slots, channels).uniform_(-bound, bound), requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return hrr_bind_bundle(x, repeated_slot_sum(self.keys, x.shape[1]).to(x.dtype))

    def regularization(self) -> Tensor:
        return bind_regularization(self.keys)

    def stacked_matrix(self, n: int) -> Tensor | None:
        if self.channels >= MATMUL_MAX_CHANNELS:
            return None
        keys = repeated_slot_sum(self.keys, n)
        return circulant(keys).permute(1, 0, 2).reshape(self.channels, n * self.channels)


class MBATBinding(_Binding):
    """MBAT binding: z_j = M_j x_j with a learned C x C matrix per slot (official grouped 1x1 Conv2d).

    ``weight`` (N, C_out, C_in) equals the official Conv2d weight (N·C, C, 1, 1) reshaped. Init as
    the official Kaiming-normal (fan_out = N·C of the grouped conv, ReLU gain).
    """

    def __init__(self, num_slots: int, channels: int, trainable: bool = True) -> None:
        super().__init__(num_slots, channels)
        std = math.sqrt(2.0 / (num_slots * channels))
        self.weight = nn.Parameter(torch.randn(num_slots, channels, channels) * std, requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        """One GEMM over the stacked slots (:meth:`stacked_matrix`); x (G, n, C, ...) is viewed, not copied."""
        self._check(x)
        g, n, c, *pixels = x.shape
        return self.bind_stacked(x.reshape(g, n * c, -1), n).view(g, c, *pixels)

    def stacked_matrix(self, n: int) -> Tensor:
        weight = repeated_slot_sum(self.weight, n)  # (n, C_out, C_in)
        return weight.permute(1, 0, 2).reshape(self.channels, n * self.channels)


class LearnedUnbinding(nn.Module):
    """MIMOConv's unbinding (spec §1.1 step 7): Linear(D, N·D) + ReLU on pooled features, then mean over r.

    (G, D) -> (G·n, D): the output row ``g·n + i`` belongs to image i of group g, the average of its
    r = N/n unbound copies (slots i, i + n, ...). The official layer is a 1x1 Conv2d with bias, the
    same map; init Kaiming-normal (fan_out = N·D, ReLU gain), bias PyTorch's default U(±1/sqrt(D)).
    """

    def __init__(self, feature_dim: int, num_slots: int) -> None:
        super().__init__()
        self.feature_dim, self.num_slots = feature_dim, num_slots
        self.linear = nn.Linear(feature_dim, num_slots * feature_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Tensor, n: int) -> Tensor:
        r = check_slots(n, self.num_slots)
        g = features.shape[0]
        out = torch.relu(self.linear(features)).view(g, r, n, self.feature_dim)
        out = out[:, 0] if r == 1 else out.mean(1)  # n = N: one copy per image, nothing to average
        return out.reshape(g * n, self.feature_dim)  # a view: rows g·n + i


def bind_regularization(keys: Tensor) -> Tensor:
    """R_bind = ||triu(K^ K^T, 1)||_F^2 / (N(N-1)/2) + sum_j (||k_j|| - 1)^2 / N  (spec §1.3).

    K^ has the unit-normalised keys as rows. Zero iff the keys are orthonormal; invariant to key
    permutation and sign. The first term is 0 for N = 1.
    """
    n = keys.shape[0]
    norms = keys.norm(dim=1)
    penalty = ((norms - 1) ** 2).sum() / n
    if n > 1:
        unit = keys / norms.clamp_min(1e-12)[:, None]
        gram = torch.triu(unit @ unit.T, diagonal=1)
        penalty = penalty + (gram**2).sum() / (n * (n - 1) / 2)
    return penalty

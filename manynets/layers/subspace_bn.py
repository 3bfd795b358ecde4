"""BatchNorm statistics of subspace points and the packed evaluation of many points (spec §3.3).

The subspace BN layers share one set of running statistics, so the statistics of a point must be
recomputed before evaluating it: the official ``update_bn`` resets the buffers and takes the
cumulative mean (``momentum=None``) over one pass of the (augmented) training data in train mode
with the point fixed. This module holds the state changes that recompute needs
(:func:`cumulative_statistics`, per-point buffers with :func:`point_statistics` and
:func:`packed_points`); the loops over a data loader are in :mod:`manynets.analysis.bn_recompute`.

Several points can run in one forward, packed side by side in the channel dimension (see
:mod:`manynets.layers.subspace`), each BN with per-point buffers updated by the same cumulative
average; :func:`packed_logits` evaluates P points, each with its own statistics, on one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from manynets.layers.subspace import (
    SubspaceMixin,
    _SubspaceBatchNorm,
    combined_parameters,
    set_point,
    subspace_layers,
)

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""BN layer name -> (running_mean (P, C), running_var (P, C))."""


def bn_layers(network: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm of ``network`` (subspace or plain)."""
    return [(n, m) for n, m in network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def cumulative_statistics(network: nn.Module) -> Iterator[None]:
    """Official ``update_bn`` state (spec §3.3): every BN's running_mean = 0, running_var = 1,
    num_batches_tracked = 0 and momentum None (cumulative mean), the network in train mode; momentum
    and mode restored on exit. Forwards inside the block make running_mean the mean of the per-batch
    means (running_var: of the unbiased batch variances)."""
    layers = [m for _, m in bn_layers(network)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = network.training
    network.train()
    try:
        yield
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        network.train(was_training)


@contextmanager
def point_statistics(
    layers: list[SubspaceMixin], bns: list[_SubspaceBatchNorm], coefficients: torch.Tensor, stats: list | None
) -> Iterator[None]:
    """Put P points (coefficients (P, S), one tensor shared by all ``layers``) and, optionally, per-point
    BN buffers ``stats`` (aligned with ``bns``: [mean (P·C,), var (P·C,), [count]]); restores the previous
    points on exit. The cheap form of :func:`packed_points` for loops that switch points every batch."""
    previous = [layer.coefficients for layer in layers]
    for layer in layers:
        layer.coefficients = coefficients
    if stats is not None:
        for m, st in zip(bns, stats):
            m.point_stats = st
    try:
        yield
    finally:
        for layer, c in zip(layers, previous):
            layer.coefficients = c
        for m in bns:
            m.point_stats = None


@contextmanager
def packed_points(network: nn.Module, coefficients: torch.Tensor, stats: dict | None = None) -> Iterator[None]:
    """Put P points (coefficients (P, S)) on every subspace layer and, optionally, per-point BN
    buffers ``stats`` (name -> [mean (P·C,), var (P·C,), [count]]); restores the previous point."""
    layers = subspace_layers(network)
    previous = [layer.coefficients for layer in layers]
    set_point(network, coefficients)
    named_bn = {n: m for n, m in network.named_modules() if isinstance(m, _SubspaceBatchNorm)}
    if stats is not None:
        missing = set(named_bn) - set(stats)
        if missing:
            raise ValueError(f"packed_points: no statistics for BN layers {sorted(missing)[:3]}.")
        for name, m in named_bn.items():
            m.point_stats = stats[name]
    try:
        yield
    finally:
        for layer, c in zip(layers, previous):
            layer.coefficients = c
        for m in named_bn.values():
            m.point_stats = None


def subspace_bns(network: nn.Module) -> list[tuple[str, _SubspaceBatchNorm]]:
    """(name, module) of every BN of ``network``; raises if one is not a subspace BN."""
    layers = bn_layers(network)
    plain = [n for n, m in layers if not isinstance(m, _SubspaceBatchNorm)]
    if plain:
        raise ValueError(f"BN layers {plain[:3]} are not subspace layers; convert the network with to_subspace first.")
    return layers


def load_bn_statistics(network: nn.Module, stats: Stats, index: int) -> None:
    """Copy point ``index``'s statistics from ``stats`` into the shared running buffers."""
    for name, m in subspace_bns(network):
        mean, var = stats[name]
        m.running_mean.copy_(mean[index])
        m.running_var.copy_(var[index])


def _unpack(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, P·D) -> (P, B, D)."""
    return x.reshape(x.shape[0], p, -1).transpose(0, 1)


@torch.no_grad()
def packed_logits(
    network: nn.Module, x: torch.Tensor, coefficients: torch.Tensor, stats: Stats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits (P, B, C) and pooled features (P, B, D) of P points on one batch.

    ``stats``: per-point BN statistics from
    :func:`~manynets.analysis.bn_recompute.collect_bn_statistics` (rows matching ``coefficients``); None
    uses the shared running statistics for every point. The network must have the ``stem / body / pool /
    head`` seams.
    """
    p = coefficients.shape[0]
    packed = None
    if stats is not None:
        packed = {n: (mean.reshape(-1), var.reshape(-1), [0]) for n, (mean, var) in stats.items()}
    was_training = network.training
    network.eval()
    try:
        with packed_points(network, coefficients, packed), combined_parameters(network):  # one point: combined once
            features = network.pool(network.body(network.stem(x)))
            logits = network.head(features)
    finally:
        network.train(was_training)
    return _unpack(logits, p), _unpack(features, p)


@torch.no_grad()
def check_packed(network: nn.Module, x: torch.Tensor, coefficients: torch.Tensor, atol: float = 1e-3) -> None:
    """Raise if the packed forward of the points differs from one forward per point on ``x``.

    Packing puts the points side by side in the channel dimension; a module that treats channels as
    structured (e.g. a zero-padding shortcut) breaks that, and this check says so.
    """
    message = (
        f"{type(network).__name__}: evaluating several subspace points at once (packed in the channel dimension) "
        "{}; some module of the network is not channel-wise (e.g. a zero-padding shortcut). Use "
        "points_per_pass=1 in the sweep."
    )
    try:
        packed, _ = packed_logits(network, x, coefficients)
    except (RuntimeError, ValueError) as err:
        raise ValueError(message.format(f"fails ({str(err).splitlines()[0]})")) from err
    was_training = network.training
    network.eval()
    try:
        for i, c in enumerate(coefficients):
            with packed_points(network, c[None]):
                single = network(x)
            err = (single - packed[i]).abs().max().item()
            if err > atol * max(1.0, single.abs().max().item()):
                raise ValueError(message.format(f"differs from one point at a time by {err:.3g}"))
    finally:
        network.train(was_training)


__all__ = [
    "SubspaceMixin",
    "bn_layers",
    "check_packed",
    "cumulative_statistics",
    "load_bn_statistics",
    "packed_logits",
    "packed_points",
    "point_statistics",
    "subspace_bns",
]

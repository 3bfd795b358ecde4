"""BatchNorm statistics of subspace points and the packed evaluation of many points (spec §3.3).

The subspace BN layers share one set of running statistics, so the statistics of a point must
be recomputed before evaluating it. :func:`recompute_bn` is the official ``update_bn``: reset the
buffers, cumulative mean (``momentum=None``) over one pass of the (augmented) training data in
train mode with the point fixed, restore the momentum. Sweeping 21 points that way costs 21 passes
over the training data (the official sweep even does 42: two model copies per α₀).

:func:`collect_bn_statistics` computes the statistics of P points in ONE pass: each batch goes
through the network once per chunk of points in packed mode (the P points side by side in the
channel dimension, see :mod:`manynets.layers.subspace`), with per-point buffers updated by the same
cumulative average. It equals P calls of :func:`recompute_bn` on the same batches (tested).
:func:`packed_logits` then evaluates the P points, each with its own statistics, in one pass over
the test data.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from manynets.layers.subspace import SubspaceMixin, _SubspaceBatchNorm, set_point, subspace_layers

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""BN layer name -> (running_mean (P, C), running_var (P, C))."""


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def bn_layers(network: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm of ``network`` (subspace or plain)."""
    return [(n, m) for n, m in network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn(
    network: nn.Module, batches: Iterable, coefficients: torch.Tensor | None = None, max_batches: int | None = None
) -> None:
    """Official ``update_bn`` (spec §3.3) at the point ``coefficients`` (S,), or the current point.

    Resets every BN's running_mean = 0, running_var = 1, num_batches_tracked = 0, sets momentum None
    (cumulative mean), forwards ``batches`` in train mode, then restores momentum and mode. The
    running mean is then the mean of the per-batch means (running_var: of the unbiased variances).
    """
    if coefficients is not None:
        set_point(network, coefficients)
    layers = [m for _, m in bn_layers(network)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = network.training
    network.train()
    device = _device(network)
    try:
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            network(_images(batch).to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        network.train(was_training)


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


def _chunks(num_points: int, chunk_size: int | None) -> list[tuple[int, int]]:
    size = chunk_size or num_points
    return [(lo, min(lo + size, num_points)) for lo in range(0, num_points, size)]


def _check_bns(network: nn.Module) -> list[tuple[str, _SubspaceBatchNorm]]:
    layers = bn_layers(network)
    plain = [n for n, m in layers if not isinstance(m, _SubspaceBatchNorm)]
    if plain:
        raise ValueError(f"BN layers {plain[:3]} are not subspace layers; convert the network with to_subspace first.")
    return layers


@torch.no_grad()
def collect_bn_statistics(
    network: nn.Module,
    batches: Iterable,
    coefficients: torch.Tensor,
    chunk_size: int | None = None,
    max_batches: int | None = None,
) -> Stats:
    """BN statistics of P points (coefficients (P, S)) in one pass over ``batches``.

    Same result as :func:`recompute_bn` once per point (cumulative mean of the batch means and of
    the unbiased batch variances), but each batch is loaded once and the points run ``chunk_size``
    at a time (default: all P) as one packed forward. Returns name -> (mean (P, C), var (P, C)); the
    shared buffers are left untouched.
    """
    layers = _check_bns(network)
    p = coefficients.shape[0]
    device = _device(network)
    dd = {"device": device, "dtype": next(network.parameters()).dtype}
    buffers = {n: (torch.zeros(p * m.num_features, **dd), torch.ones(p * m.num_features, **dd)) for n, m in layers}
    chunks = _chunks(p, chunk_size)
    counts = {(n, c): [0] for n, _ in layers for c in range(len(chunks))}
    was_training = network.training
    network.train()
    try:
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            x = _images(batch).to(device)
            for c, (lo, hi) in enumerate(chunks):
                stats = {}
                for n, m in layers:
                    mean, var = buffers[n]
                    k = m.num_features
                    stats[n] = (mean[lo * k : hi * k], var[lo * k : hi * k], counts[(n, c)])
                with packed_points(network, coefficients[lo:hi], stats):
                    network(x)
    finally:
        network.train(was_training)
    return {n: (mean.view(p, -1), var.view(p, -1)) for n, (mean, var) in buffers.items()}


def load_bn_statistics(network: nn.Module, stats: Stats, index: int) -> None:
    """Copy point ``index``'s statistics from ``stats`` into the shared running buffers."""
    for name, m in _check_bns(network):
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

    ``stats``: per-point BN statistics from :func:`collect_bn_statistics` (rows matching
    ``coefficients``); None uses the shared running statistics for every point. The network must
    have the ``stem / body / pool / head`` seams.
    """
    p = coefficients.shape[0]
    packed = None
    if stats is not None:
        packed = {n: (mean.reshape(-1), var.reshape(-1), [0]) for n, (mean, var) in stats.items()}
    was_training = network.training
    network.eval()
    try:
        with packed_points(network, coefficients, packed):
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
    "collect_bn_statistics",
    "load_bn_statistics",
    "packed_logits",
    "packed_points",
    "recompute_bn",
]

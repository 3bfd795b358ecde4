"""BatchNorm statistics of subspace points over the training data (spec superposition_mixmo_subspaces §3.3).

The subspace BN layers share one set of running statistics, so each evaluated point needs its own
(the state changes are in :mod:`manynets.layers.subspace_bn`; these are the loops over a loader):

- :func:`recompute_bn`: the official ``update_bn`` at one point: reset, cumulative mean over one pass
  of the (augmented) training data in train mode under ``no_grad``. The point's parameters are
  combined once for the whole pass (:func:`~manynets.layers.subspace.combined_parameters`), so the pass
  costs its forwards and nothing more.
- :func:`collect_bn_statistics`: the statistics of P points with each training batch loaded once.
  On a CPU the points run one at a time on the batch (each with its parameters combined in one
  foreach op and its own BN buffers: the cost is the P forwards); on CUDA they run packed side by side
  in the channel dimension, ``chunk_size`` at a time, as grouped convolutions (a few large kernels
  instead of many small ones). Both equal :func:`recompute_bn` once per point on the same batches (tested).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from manynets.analysis.passes import device_of
from manynets.layers.subspace import combined_parameters, set_point, subspace_layers
from manynets.layers.subspace_bn import Stats, cumulative_statistics, point_statistics, subspace_bns


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
    device = device_of(network)
    with cumulative_statistics(network), combined_parameters(network):
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            network(_images(batch).to(device))


def default_chunk_size(device: torch.device, num_points: int) -> int:
    """Points per forward: all of them packed on CUDA (grouped convolutions pay there), one on a CPU
    (separate convolutions are faster there, benchmarks/subspaces.py)."""
    return num_points if device.type == "cuda" else 1


@torch.no_grad()
def collect_bn_statistics(
    network: nn.Module,
    batches: Iterable,
    coefficients: torch.Tensor,
    chunk_size: int | None = None,
    max_batches: int | None = None,
) -> Stats:
    """BN statistics of P points (coefficients (P, S)) with each batch of ``batches`` loaded once.

    Same result as :func:`recompute_bn` once per point (cumulative mean of the batch means and of
    the unbiased batch variances). The points run ``chunk_size`` at a time (default
    :func:`default_chunk_size`: one on a CPU, all packed on CUDA). Returns name -> (mean (P, C),
    var (P, C)); the shared buffers are left untouched.
    """
    named = subspace_bns(network)
    bns = [m for _, m in named]
    layers = subspace_layers(network)
    p = coefficients.shape[0]
    device = device_of(network)
    dtype = next(network.parameters()).dtype
    coefficients = coefficients.to(device=device, dtype=dtype)
    size = chunk_size or default_chunk_size(device, p)
    chunks = [(lo, min(lo + size, p)) for lo in range(0, p, size)]
    buffers = [(torch.zeros(p * m.num_features, device=device, dtype=dtype),
                torch.ones(p * m.num_features, device=device, dtype=dtype)) for m in bns]  # fmt: skip
    per_chunk = [  # views of every BN's buffers for the chunk's points, and its batch count
        [(mean[lo * m.num_features : hi * m.num_features], var[lo * m.num_features : hi * m.num_features], [0])
         for m, (mean, var) in zip(bns, buffers)]
        for lo, hi in chunks
    ]  # fmt: skip
    points = [coefficients[lo:hi] for lo, hi in chunks]
    was_training = network.training
    network.train()
    try:
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            x = _images(batch).to(device)
            for point, stats in zip(points, per_chunk):
                with point_statistics(layers, bns, point, stats), combined_parameters(layers):
                    network(x)
    finally:
        network.train(was_training)
    return {n: (mean.view(p, -1), var.view(p, -1)) for (n, _), (mean, var) in zip(named, buffers)}

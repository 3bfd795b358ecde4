"""The π-layer kernel, streamed over the M rows of the state (spec pinet_saturation §1.3, §1.4, §1.9).

An infinite π-layer (``manynets.layers.pi.InfPiLayer``) holds ``A`` (M x r_out), ``B`` (M x r, unit rows)
and ``Amult`` (M). For an input batch with unit directions ``gbar`` (b x r) and norms ``s`` (b):

    forward   out = (phi(gbar B^T) * s * Amult) @ A                                  (b x r_out)
    backward  gamma = (delta @ A^T) * Amult                                            (b x M)
              grad  = (gamma * phi'(q)) @ B + [sum_m gamma * sqrt(1 - q^2) / 2 pi] * gbar   (b x r)

with ``q = gbar B^T``. ``grad`` is the gradient w.r.t. ``g = s * gbar`` (spec §1.4: the radial term
``sum gamma psi * g`` with ``psi = sqrt(1 - q^2) / (2 pi s)`` equals the term above).

M grows by the batch size at every step (2.5 million rows in the paper's CIFAR-10 run), so both
functions walk over M in chunks of ``chunk_size`` rows: peak memory is the state plus
O(batch x chunk), never a (batch x M) matrix. Chunks of ``A``/``B`` stored in fp16/bf16 are cast to
the compute dtype (at least fp32); ``Amult`` is fp32.

Each of ``A``, ``B``, ``Amult`` is one tensor or a list of row blocks (the layer stores A/B in blocks of
a fixed number of rows so that growing never copies them). :func:`row_chunks` cuts chunks at multiples
of ``chunk_size`` counted from row 0 whatever the blocks, so the result does not depend on the block
layout: a chunk inside one block is a view, a chunk across a block border a copy of at most
``chunk_size`` rows.

``pi_forward_reference`` is the straightforward formulation (one b x M matrix, autograd through it):
the independent reference of the tests and the baseline of ``benchmarks/pinet.py``.

Both chunked functions are registered as ``torch.library`` custom ops (``manynets::pi_forward``,
``manynets::pi_backward``; the state as lists of blocks) with fake implementations; :func:`pi_forward` /
:func:`pi_backward` go through them while ``torch.compile`` traces (opaque to the compiler) and call them
directly in eager mode. No fused GPU kernel ships yet: it needs a GPU session to be tested against this
reference.
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence, Union

import torch

from manynets.cuda_ops.pi_math import phi, phi_prime, psi_numerator

DEFAULT_CHUNK = 16384
"""Rows per chunk. 16384 keeps a chunk's (batch x chunk) working set in cache on a CPU: measured 2.5x
faster than the straightforward formulation at M = 1e5 and 1e6 rows, against 1.4x at 1e5 with 65536
(``benchmarks/pinet.py``, 2-core CPU, 1 thread). On a GPU larger chunks may pay (untimed here)."""

Rows = Union[torch.Tensor, Sequence[torch.Tensor]]
"""A state tensor of M rows, whole or as a list of row blocks."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def as_blocks(rows: Rows) -> list[torch.Tensor]:
    """The row blocks of ``rows``: ``[rows]`` for one tensor."""
    return [rows] if isinstance(rows, torch.Tensor) else list(rows)


def _take(blocks: list[torch.Tensor], cursor: list[int], n: int) -> torch.Tensor:
    """The ``n`` rows after ``cursor`` = [block index, row in that block], advancing it: a view when they
    lie in one block, else the pieces concatenated."""
    parts = []
    while n:
        block = blocks[cursor[0]]
        take = min(n, block.shape[0] - cursor[1])
        if take:
            parts.append(block[cursor[1] : cursor[1] + take])
        n -= take
        cursor[1] += take
        if cursor[1] == block.shape[0]:
            cursor[0], cursor[1] = cursor[0] + 1, 0
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_chunks(chunk_size: int, *states: Rows) -> Iterator[tuple[torch.Tensor, ...]]:
    """Rows ``[lo, lo + chunk_size)`` of every state for lo = 0, chunk_size, ... < M (module doc).

    The states (e.g. A, B, Amult) have M rows each and may be cut into blocks at different rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
    blocks = [as_blocks(state) for state in states]
    totals = sorted({sum(block.shape[0] for block in bs) for bs in blocks})
    if len(totals) != 1:
        raise ValueError(f"row_chunks: the states have different numbers of rows {totals}.")
    cursors = [[0, 0] for _ in blocks]
    for lo in range(0, totals[0], chunk_size):
        n = min(chunk_size, totals[0] - lo)
        yield tuple(_take(bs, cursor, n) for bs, cursor in zip(blocks, cursors))


def pi_forward_chunked(gbar: torch.Tensor, s: torch.Tensor, A: Rows, B: Rows, Amult: Rows,
                       chunk_size: int) -> torch.Tensor:  # fmt: skip
    """``(phi(gbar B^T) * s * Amult) @ A`` streamed over M in chunks; gbar (b, r), s (b,)."""
    dtype = _compute_dtype(gbar)
    gbar, s = gbar.to(dtype), s.to(dtype)
    out = torch.zeros(gbar.shape[0], as_blocks(A)[0].shape[1], dtype=dtype, device=gbar.device)
    for a, b, mult in row_chunks(chunk_size, A, B, Amult):
        w = phi(gbar @ b.to(dtype).T)
        w.mul_(mult.to(dtype))
        out.addmm_(w, a.to(dtype))
    return out.mul_(s[:, None])


def pi_backward_chunked(delta: torch.Tensor, gbar: torch.Tensor, A: Rows, B: Rows, Amult: Rows,
                        chunk_size: int) -> torch.Tensor:  # fmt: skip
    """Gradient w.r.t. the layer input g = s * gbar of ``sum(delta * forward)`` (module doc), chunked over M."""
    dtype = _compute_dtype(gbar)
    gbar, delta = gbar.to(dtype), delta.to(dtype)
    grad = torch.zeros_like(gbar)
    radial = torch.zeros(gbar.shape[0], dtype=dtype, device=gbar.device)
    for a, b, mult in row_chunks(chunk_size, A, B, Amult):
        Bc = b.to(dtype)
        q = gbar @ Bc.T
        gamma = delta @ a.to(dtype).T
        gamma.mul_(mult.to(dtype))
        radial += (gamma * psi_numerator(q)).sum(1)
        grad.addmm_(gamma.mul_(phi_prime(q)), Bc)
    return grad.add_(radial[:, None] * gbar)


# The chunked functions as torch.library custom ops (the state as lists of row blocks), with fake (meta)
# implementations for tracing.
@torch.library.custom_op("manynets::pi_forward", mutates_args=())
def pi_forward_op(gbar: torch.Tensor, s: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor],
                  Amult: list[torch.Tensor], chunk_size: int) -> torch.Tensor:  # fmt: skip
    return pi_forward_chunked(gbar, s, A, B, Amult, chunk_size)


@torch.library.custom_op("manynets::pi_backward", mutates_args=())
def pi_backward_op(delta: torch.Tensor, gbar: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor],
                   Amult: list[torch.Tensor], chunk_size: int) -> torch.Tensor:  # fmt: skip
    return pi_backward_chunked(delta, gbar, A, B, Amult, chunk_size)


pi_forward_op.register_fake(
    lambda gbar, s, A, B, Amult, chunk_size: gbar.new_empty(gbar.shape[0], A[0].shape[1], dtype=_compute_dtype(gbar))
)
pi_backward_op.register_fake(
    lambda delta, gbar, A, B, Amult, chunk_size: torch.empty_like(gbar, dtype=_compute_dtype(gbar))
)


def _compiling() -> bool:
    # torch.compiler.is_compiling() imports dynamo (seconds) on first use; without dynamo loaded we are not compiling
    return "torch._dynamo" in sys.modules and torch.compiler.is_compiling()


def pi_forward(gbar, s, A: Rows, B: Rows, Amult: Rows, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The chunked forward; through the registered custom op while ``torch.compile`` traces (the op's
    dispatch costs about a millisecond per call on CPU, too much for small eager layers)."""
    if _compiling():
        return pi_forward_op(gbar, s, as_blocks(A), as_blocks(B), as_blocks(Amult), chunk_size)
    return pi_forward_chunked(gbar, s, A, B, Amult, chunk_size)


def pi_backward(delta, gbar, A: Rows, B: Rows, Amult: Rows, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The chunked backward (custom op while compiling, as :func:`pi_forward`)."""
    if _compiling():
        return pi_backward_op(delta, gbar, as_blocks(A), as_blocks(B), as_blocks(Amult), chunk_size)
    return pi_backward_chunked(delta, gbar, A, B, Amult, chunk_size)


def pi_forward_reference(
    gbar: torch.Tensor, s: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Amult: torch.Tensor
) -> torch.Tensor:
    """The straightforward unchunked formula (one b x M matrix); differentiable by autograd."""
    dtype = _compute_dtype(gbar)
    q = gbar.to(dtype) @ B.to(dtype).T
    return (phi(q) * s.to(dtype)[:, None] * Amult.to(dtype)) @ A.to(dtype)

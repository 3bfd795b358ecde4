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

``pi_forward_reference`` is the straightforward formulation (one b x M matrix, autograd through it):
the independent reference of the tests and the baseline of ``benchmarks/pinet.py``.

Both chunked functions are registered as ``torch.library`` custom ops (``manynets::pi_forward``,
``manynets::pi_backward``) with fake implementations; :func:`pi_forward` / :func:`pi_backward` go
through them while ``torch.compile`` traces (opaque to the compiler) and call them directly in eager mode.
No fused GPU kernel ships yet: it needs a GPU session to be tested against this reference.
"""

from __future__ import annotations

import sys

import torch

from manynets.cuda_ops.pi_math import phi, phi_prime, psi_numerator

DEFAULT_CHUNK = 16384
"""Rows per chunk. 16384 keeps a chunk's (batch x chunk) working set in cache on a CPU: measured 2.5x
faster than the straightforward formulation at M = 1e5 and 1e6 rows, against 1.4x at 1e5 with 65536
(``benchmarks/pinet.py``, 2-core CPU, 1 thread). On a GPU larger chunks may pay (untimed here)."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunks(rows: int, chunk_size: int):
    """Slices of ``chunk_size`` rows covering ``range(rows)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
    return (slice(lo, min(lo + chunk_size, rows)) for lo in range(0, rows, chunk_size))


def pi_forward_chunked(
    gbar: torch.Tensor, s: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Amult: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``(phi(gbar B^T) * s * Amult) @ A`` streamed over M in chunks; gbar (b, r), s (b,)."""
    dtype = _compute_dtype(gbar)
    gbar, s = gbar.to(dtype), s.to(dtype)
    out = torch.zeros(gbar.shape[0], A.shape[1], dtype=dtype, device=gbar.device)
    for rows in _chunks(A.shape[0], chunk_size):
        w = phi(gbar @ B[rows].to(dtype).T)
        w.mul_(Amult[rows].to(dtype))
        out.addmm_(w, A[rows].to(dtype))
    return out.mul_(s[:, None])


def pi_backward_chunked(
    delta: torch.Tensor, gbar: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Amult: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Gradient w.r.t. the layer input g = s * gbar of ``sum(delta * forward)`` (module doc), chunked over M."""
    dtype = _compute_dtype(gbar)
    gbar, delta = gbar.to(dtype), delta.to(dtype)
    grad = torch.zeros_like(gbar)
    radial = torch.zeros(gbar.shape[0], dtype=dtype, device=gbar.device)
    for rows in _chunks(A.shape[0], chunk_size):
        Bc = B[rows].to(dtype)
        q = gbar @ Bc.T
        gamma = delta @ A[rows].to(dtype).T
        gamma.mul_(Amult[rows].to(dtype))
        radial += (gamma * psi_numerator(q)).sum(1)
        grad.addmm_(gamma.mul_(phi_prime(q)), Bc)
    return grad.add_(radial[:, None] * gbar)


# The chunked functions as torch.library custom ops, with fake (meta) implementations for tracing.
pi_forward_op = torch.library.custom_op("manynets::pi_forward", pi_forward_chunked, mutates_args=())
pi_forward_op.register_fake(
    lambda gbar, s, A, B, Amult, chunk_size: gbar.new_empty(gbar.shape[0], A.shape[1], dtype=_compute_dtype(gbar))
)
pi_backward_op = torch.library.custom_op("manynets::pi_backward", pi_backward_chunked, mutates_args=())
pi_backward_op.register_fake(
    lambda delta, gbar, A, B, Amult, chunk_size: torch.empty_like(gbar, dtype=_compute_dtype(gbar))
)


def _compiling() -> bool:
    # torch.compiler.is_compiling() imports dynamo (seconds) on first use; without dynamo loaded we are not compiling
    return "torch._dynamo" in sys.modules and torch.compiler.is_compiling()


def pi_forward(gbar, s, A, B, Amult, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The chunked forward; through the registered custom op while ``torch.compile`` traces (the op's
    dispatch costs about a millisecond per call on CPU, too much for small eager layers)."""
    if _compiling():
        return pi_forward_op(gbar, s, A, B, Amult, chunk_size)
    return pi_forward_chunked(gbar, s, A, B, Amult, chunk_size)


def pi_backward(delta, gbar, A, B, Amult, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The chunked backward (custom op while compiling, as :func:`pi_forward`)."""
    if _compiling():
        return pi_backward_op(delta, gbar, A, B, Amult, chunk_size)
    return pi_backward_chunked(delta, gbar, A, B, Amult, chunk_size)


def pi_forward_reference(
    gbar: torch.Tensor, s: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Amult: torch.Tensor
) -> torch.Tensor:
    """The straightforward unchunked formula (one b x M matrix); differentiable by autograd."""
    dtype = _compute_dtype(gbar)
    q = gbar.to(dtype) @ B.to(dtype).T
    return (phi(q) * s.to(dtype)[:, None] * Amult.to(dtype)) @ A.to(dtype)


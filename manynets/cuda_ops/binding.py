"""HRR binding along channels at every pixel: circular convolution by FFT (spec §1.2).

MIMOConv (Menet et al., NeurIPS 2023) binds slot j of a superposition with a key
k_j in R^C by circular convolution along the channel axis at every pixel, then sums
the slots (bundling)::

    s[g, :, h, w] = sum_j  x[g, j, :, h, w] (*) k_j,     (a (*) k)[m] = sum_t a[t] k[(m - t) mod C]

The same op binds vector features (G, n, C) (a stem that ends in a Linear layer, e.g. an MLP): there is
one "pixel", ``s[g] = sum_j x[g, j] (*) k_j``; any trailing spatial axes are treated alike.

The official code (``IBM/multiple-input-multiple-output-nets`` ``MIMOConv/src/superposition.py``)
computes it as a grouped ``Conv1d`` (groups = N, kernel C, circular padding C/2, first output
dropped), O(C^2) per pixel. That conv computes ``out[m] = sum_j x[j] w[(j - m - 1 + C/2) mod C]``,
the circular convolution with the key ``k[t] = w[(C/2 - 1 - t) mod C]``: the weight reversed and
rolled by C/2 (:func:`conv1d_weight_to_key`; the map is its own inverse). Here it is computed with
real FFTs in O(C log C), with the slot sum in the frequency domain so one inverse FFT serves all
slots; for small C (MIMONet's C0 = 64) one GEMM with the keys' circulant matrices is faster on a CPU,
and ``method="auto"`` picks it there (both are exact; see :func:`hrr_bind_bundle`).

:func:`hrr_bind_bundle` is a ``torch.library`` custom op (``manynets::hrr_bind_bundle``) with a
fake (meta) implementation, an autograd formula and an autocast rule (float32 inside autocast regions:
cuFFT has no bf16), so ``torch.compile`` traces it as one node and ``bf16-mixed`` binds in float32. Its
implementation is the torch reference and runs on any device; a fused GPU bind-and-bundle kernel is
not provided (no GPU was available to test one against this reference).

Unbinding in MIMOConv is learned (see :class:`manynets.layers.binding.LearnedUnbinding`); the HRR
correlation :func:`hrr_unbind` is provided for analysis: a key with ``|FFT(k)| = 1`` inverts exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "circulant",
    "circular_convolution",
    "circular_correlation",
    "conv1d_weight_to_key",
    "grouped_conv1d_bind",
    "hrr_bind",
    "hrr_bind_bundle",
    "hrr_unbind",
    "key_to_conv1d_weight",
]


def _fft_dtype(x: Tensor) -> torch.dtype:
    """FFTs in at least float32 (half-precision FFTs need power-of-two sizes on CUDA, none on CPU)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def circular_convolution(x: Tensor, k: Tensor, dim: int = -1) -> Tensor:
    """``(x (*) k)[m] = sum_t x[t] k[(m - t) mod C]`` along ``dim`` (broadcasting), by real FFT."""
    c = x.shape[dim]
    dt = _fft_dtype(x)
    out = torch.fft.irfft(torch.fft.rfft(x.to(dt), dim=dim) * torch.fft.rfft(k.to(dt), dim=dim), n=c, dim=dim)
    return out.to(x.dtype)


def circular_correlation(x: Tensor, k: Tensor, dim: int = -1) -> Tensor:
    """``(x (.) k)[m] = sum_t x[t + m] k[t]`` along ``dim``: the HRR approximate inverse of binding with k."""
    c = x.shape[dim]
    dt = _fft_dtype(x)
    xf, kf = torch.fft.rfft(x.to(dt), dim=dim), torch.fft.rfft(k.to(dt), dim=dim)
    return torch.fft.irfft(xf * kf.conj(), n=c, dim=dim).to(x.dtype)


def hrr_bind(x: Tensor, key: Tensor, dim: int = -1) -> Tensor:
    """HRR binding of x with key along ``dim`` (circular convolution), without bundling."""
    return circular_convolution(x, key, dim)


def hrr_unbind(s: Tensor, key: Tensor, dim: int = -1) -> Tensor:
    """HRR unbinding by circular correlation with the key (Plate 1995). Exact when ``|FFT(key)| = 1``.

    MIMOConv itself never unbinds this way (its unbinding is a learned layer, spec §1.2);
    this is for analysis, e.g. how much of a slot survives bundling with random keys.
    """
    return circular_correlation(s, key, dim)


def conv1d_weight_to_key(weight: Tensor) -> Tensor:
    """Official grouped-Conv1d weight (..., C) -> convolution key: ``k[t] = w[(C/2 - 1 - t) mod C]``.

    Reversal followed by a roll of C/2. The map is an involution, so it also converts keys back
    (:func:`key_to_conv1d_weight`). C must be even (the official padding is C/2).
    """
    c = weight.shape[-1]
    if c % 2:
        raise ValueError(f"HRR key length C={c} must be even (the official Conv1d pads C/2 on each side).")
    return torch.roll(weight.flip(-1), c // 2, dims=-1)


key_to_conv1d_weight = conv1d_weight_to_key


def grouped_conv1d_bind(x: Tensor, weight: Tensor) -> Tensor:
    """The official binding formulation, for tests and benchmarks: per-slot bound maps, not summed.

    Args:
        x: (G, N, C, H, W) slots.
        weight: (N, 1, C) grouped Conv1d weight (in = out = N, groups = N, kernel C).

    Returns:
        (G, N, C, H, W): slot j bound with ``conv1d_weight_to_key(weight[j, 0])``.
    """
    g, n, c, h, w = x.shape
    rows = x.permute(0, 3, 4, 1, 2).reshape(g * h * w, n, c)
    rows = F.pad(rows, (c // 2, c // 2), mode="circular")
    out = F.conv1d(rows, weight, groups=n)[..., 1:]
    return out.reshape(g, h, w, n, c).permute(0, 3, 4, 1, 2)


# -- the custom op: bind each slot with its key and bundle (sum over slots) -------------------------


def _check_bind_args(x: Tensor, keys: Tensor) -> None:
    if x.dim() < 3 or keys.dim() != 2 or x.shape[1] != keys.shape[0] or x.shape[2] != keys.shape[1]:
        raise ValueError(
            f"hrr_bind_bundle expects x (G, n, C, H, W) or (G, n, C) and keys (n, C); got x {tuple(x.shape)} "
            f"and keys {tuple(keys.shape)}. Reshape the batch to groups of n slots first."
        )


MATMUL_MAX_CHANNELS = 192
"""``method="auto"`` binds by circulant matmul below this key length and by FFT from it on."""


def circulant(keys: Tensor) -> Tensor:
    """(n, C) keys -> (n, C, C) circulant matrices ``M[j, m, t] = keys[j, (m - t) mod C]`` (M_j x = x (*) k_j)."""
    c = keys.shape[-1]
    ar = torch.arange(c, device=keys.device)
    return keys[:, (ar[:, None] - ar[None, :]) % c]


def _bind_matmul(x: Tensor, keys: Tensor) -> Tensor:
    """x (G, n, C, P) with P pixels -> (G, C, P)."""
    g, n, c, p = x.shape
    stacked = circulant(keys.to(x.dtype)).permute(1, 0, 2).reshape(c, n * c)  # [M_1 ... M_n]
    return torch.matmul(stacked, x.reshape(g, n * c, p))


def _bind_fft(x: Tensor, keys: Tensor) -> Tensor:
    """x (G, n, C, P) with P pixels -> (G, C, P)."""
    c = x.shape[2]
    dt = _fft_dtype(x)
    xf = torch.fft.rfft(x.to(dt), dim=2)  # (G, n, F, P)
    kf = torch.fft.rfft(keys.to(dt), dim=1)  # (n, F)
    sf = torch.einsum("gnfp,nf->gfp", xf, kf)
    return torch.fft.irfft(sf, n=c, dim=1).to(x.dtype).contiguous()


def _use_fft(method: str, channels: int) -> bool:
    if method not in ("auto", "fft", "matmul"):
        raise ValueError(f"hrr_bind_bundle method={method!r}; expected 'auto', 'fft' or 'matmul'.")
    return method == "fft" or (method == "auto" and channels >= MATMUL_MAX_CHANNELS)


@torch.library.custom_op("manynets::hrr_bind_bundle", mutates_args=())
def hrr_bind_bundle(x: Tensor, keys: Tensor, method: str = "auto") -> Tensor:
    """Bind slot j of ``x`` (G, n, C, H, W) with ``keys[j]`` (n, C) along C and sum the slots -> (G, C, H, W).

    ``out[g, :, h, w] = sum_j x[g, j, :, h, w] (*) keys[j]`` (circular convolution, spec §1.1 step 4).
    Vectors (G, n, C) -> (G, C) likewise (``out[g] = sum_j x[g, j] (*) keys[j]``), and any other trailing
    axes after C.

    ``method``: ``fft`` (one rFFT of x, a complex multiply-add over slots, one inverse rFFT; O(C log C)
    per pixel), ``matmul`` (one GEMM with the stacked circulant matrices of the keys, O(n C^2) per pixel
    but dense BLAS: faster for small C such as MIMONet's C0 = 64 on CPU) or ``auto`` (matmul below
    :data:`MATMUL_MAX_CHANNELS`, the crossover measured on a 2-core CPU, else FFT). All compute the
    same circular convolution.
    """
    _check_bind_args(x, keys)
    g, n, c, *pixels = x.shape
    flat = x.reshape(g, n, c, -1)
    out = _bind_fft(flat, keys) if _use_fft(method, c) else _bind_matmul(flat, keys)
    return out.view(g, c, *pixels)


@hrr_bind_bundle.register_fake
def _(x: Tensor, keys: Tensor, method: str = "auto") -> Tensor:
    _check_bind_args(x, keys)
    g, _, c, *pixels = x.shape
    return x.new_empty((g, c, *pixels))


def _setup_context(ctx, inputs, output) -> None:
    x, keys, method = inputs
    ctx.save_for_backward(x, keys)
    ctx.method = method


def _backward(ctx, grad: Tensor):
    """d/dx_j = grad (.) k_j (correlation = transposed circulant); d/dk_j[s] = sum over g, h, w, m of
    grad[m] x_j[m - s]."""
    x, keys = ctx.saved_tensors
    shape = x.shape
    g, n, c = shape[:3]
    x = x.reshape(g, n, c, -1)
    p = x.shape[3]
    grad_x = grad_keys = None
    if _use_fft(ctx.method, c):
        dt = _fft_dtype(x)
        gf = torch.fft.rfft(grad.reshape(g, c, p).to(dt), dim=1)  # (G, F, P)
        if ctx.needs_input_grad[0]:
            kf = torch.fft.rfft(keys.to(dt), dim=1)
            grad_x = torch.fft.irfft(gf.unsqueeze(1) * kf.conj()[None, :, :, None], n=c, dim=2)
            grad_x = grad_x.to(x.dtype).reshape(shape).contiguous()
        if ctx.needs_input_grad[1]:
            xf = torch.fft.rfft(x.to(dt), dim=2)
            grad_keys = torch.fft.irfft(torch.einsum("gnfp,gfp->nf", xf.conj(), gf), n=c, dim=1).to(keys.dtype)
        return grad_x, grad_keys, None
    grad_rows = grad.reshape(g, c, p)
    if ctx.needs_input_grad[0]:
        stacked = circulant(keys.to(x.dtype)).permute(1, 0, 2).reshape(c, n * c)
        grad_x = torch.matmul(stacked.T, grad_rows).reshape(shape)
    if ctx.needs_input_grad[1]:
        # A[m, j, t] = sum_(g, p) grad[g, m, p] x[g, j, t, p]; grad_k[j, s] = sum_m A[m, j, (m - s) mod C]
        a = torch.bmm(grad_rows, x.reshape(g, n * c, p).transpose(1, 2)).sum(0).view(c, n, c)
        ar = torch.arange(c, device=x.device)
        diag = (ar[:, None] - ar[None, :]) % c  # (m, s) -> t
        grad_keys = a.permute(1, 0, 2).gather(2, diag.expand(n, c, c)).sum(1).to(keys.dtype)
    return grad_x, grad_keys, None


hrr_bind_bundle.register_autograd(_backward, setup_context=_setup_context)

# Under autocast (bf16-mixed, fp16) the op casts its inputs to float32 and computes, and returns, float32:
# cuFFT and PocketFFT have no bf16 transforms, and the circulant GEMM sums n·C products per output, which
# bf16 (8 bits of mantissa) would round far more coarsely than the convolutions around it.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("manynets::hrr_bind_bundle", _device, torch.float32)

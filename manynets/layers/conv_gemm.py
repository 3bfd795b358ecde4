"""A convolution as one GEMM over image patches (im2col), with an eval-mode BatchNorm folded in.

A stem convolution with few input channels (RGB: 3 -> 64, 3x3, so K = 27 products per output) runs
far below the GEMM rate of the wider convolutions after it in the library kernels on a CPU (about
1.5 GMAC/s against tens for the body, measured on MIMONet's stem). Written as

    out[b, o, p] = sum_k W[o, k] cols[b, k, p] + bias[o],   cols = im2col(x), k over (c, i, j),

it is one batched GEMM (Chellapilla et al., "High Performance Convolutional Neural Networks for
Document Processing", 2006), whose output is already in the (B, O, H, W) layout. In evaluation a
following BatchNorm is an affine map per channel, ``s z + (beta - s mu)`` with ``s = gamma /
sqrt(var + eps)`` (Ioffe & Szegedy, ICML 2015, Alg. 2), so it folds into the weight and bias
(:func:`fold_batchnorm`) and conv-BN-ReLU is one GEMM plus an in-place ReLU.

Everything here is differentiable (im2col is views plus one copy; the GEMM is ``baddbmm``); the BN fold
uses running statistics, so it equals the module only in evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["ConvBNReLU", "conv2d_gemm", "fold_batchnorm", "im2col"]


def im2col(x: Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0) -> Tensor:
    """Patches (B, C·kh·kw, Ho·Wo) of x (B, C, H, W) with zero padding, in :func:`torch.nn.functional.unfold`'s
    order (c, i, j); zero padding, then two ``Tensor.unfold`` views and one copy (several times faster
    than ``F.unfold`` on a CPU)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw), a view
    b, c, ho, wo = patches.shape[:4]
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, ho * wo)


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
                padding: int | tuple[int, int] = 0) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1, zero padding) as
    ``weight (O, K) @ im2col(x) (B, K, P) + bias``: one batched GEMM; (B, O, Ho, Wo), contiguous."""
    o, c, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != c:
        raise ValueError(f"conv2d_gemm expects x (B, {c}, H, W) for a weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}.")
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    ho, wo = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    cols = im2col(x, (kh, kw), (sh, sw), (ph, pw))
    w = weight.reshape(o, c * kh * kw).expand(x.shape[0], o, c * kh * kw)
    if bias is None:
        out = torch.bmm(w, cols)
    else:
        out = torch.baddbmm(bias[:, None].expand(x.shape[0], o, cols.shape[2]), w, cols)
    return out.view(x.shape[0], o, ho, wo)


def fold_batchnorm(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` with ``bn``'s running statistics: ``(s·W, s·(b - mu) + beta)``,
    ``s = gamma / sqrt(var + eps)`` per output channel (no affine: gamma 1, beta 0)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), shift


class ConvBNReLU:
    """``relu(bn(conv(x)))`` as one GEMM (:func:`conv2d_gemm`) with ``bn``'s running statistics folded into
    the weight and bias (:func:`fold_batchnorm`) and the ReLU in place: for a zero-padded Conv2d (groups 1,
    dilation 1), optionally followed by an eval-mode BatchNorm2d and a ReLU (MIMONet's stem, spec §1.1
    step 2).

    The fold is taken when the object is built: build one per forward pass (:meth:`match` is cheap).
    :meth:`match` returns None for any other module (another layer, a BN in training mode, grouped or
    dilated convs), and callers fall back to the module itself.

    Args:
        conv: the convolution.
        bn: the BatchNorm after it, or None.
        relu: whether a ReLU follows.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, relu: bool = False) -> None:
        self.stride, self.padding, self.relu = conv.stride, conv.padding, relu
        self.weight, self.bias = (conv.weight, conv.bias) if bn is None else fold_batchnorm(conv.weight, conv.bias, bn)

    @classmethod
    def match(cls, module: nn.Module) -> ConvBNReLU | None:
        layers = list(module) if isinstance(module, nn.Sequential) else [module]
        conv = layers.pop(0) if layers else None
        if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1)
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            return None
        bn = layers.pop(0) if layers and isinstance(layers[0], nn.BatchNorm2d) else None
        if bn is not None and (bn.training or bn.running_mean is None):
            return None
        relu = bool(layers) and type(layers[0]) is nn.ReLU
        if relu:
            layers.pop(0)
        return None if layers else cls(conv, bn, relu)

    def __call__(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = conv2d_gemm(x, self.weight.to(x.dtype), bias, self.stride, self.padding)
        return out.relu_() if self.relu else out

"""A convolution as one GEMM over im2col patches, and conv-BN-ReLU with the BN folded (layers/conv_gemm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manynets.layers.conv_gemm import ConvBNReLU, conv2d_gemm, im2col


@pytest.mark.parametrize(("kernel", "stride", "padding"),
                         [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3), ((3, 1), 1, (1, 0))])
def test_conv2d_gemm_equals_conv2d_with_gradients(kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 13, 12, requires_grad=True)
    conv = nn.Conv2d(3, 16, kernel, stride, padding)
    channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for inputs in (x, channels_last):
        out = conv2d_gemm(inputs, conv.weight, conv.bias, stride, padding)
        ref = F.conv2d(inputs, conv.weight, conv.bias, stride, padding)
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (inputs, conv.weight, conv.bias), grad)
        want = torch.autograd.grad(ref, (inputs, conv.weight, conv.bias), grad)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert torch.equal(im2col(x, kernel, stride, padding), F.unfold(x, kernel, padding=padding, stride=stride))
    assert conv2d_gemm(x, conv.weight, None, stride, padding).shape == ref.shape


def test_conv_bn_relu_folds_eval_batchnorm_and_matches_only_its_pattern():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=True), bn, nn.ReLU()).eval()
    x = torch.randn(4, 3, 9, 9)
    fused = ConvBNReLU.match(stem)
    assert fused is not None
    ref = stem(x)
    assert torch.allclose(fused(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for partial in (stem[0], stem[:2]):  # conv alone, conv-BN
        assert torch.allclose(ConvBNReLU.match(partial)(x), partial(x), rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert ConvBNReLU.match(stem.train()) is None  # BN in training uses batch statistics
    stem.eval()
    assert ConvBNReLU.match(nn.Sequential(*stem, nn.MaxPool2d(2))) is None
    assert ConvBNReLU.match(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))) is None
    assert ConvBNReLU.match(nn.Sequential(nn.Conv2d(3, 8, 3, dilation=2))) is None
    assert ConvBNReLU.match(nn.Linear(3, 4)) is None

"""HRR / MBAT binding, learned unbinding, R_bind and R_iso against independent references (spec §1.2, 1.3, 1.9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from manynets.cuda_ops.binding import (
    MATMUL_MAX_CHANNELS,
    conv1d_weight_to_key,
    grouped_conv1d_bind,
    hrr_bind,
    hrr_bind_bundle,
    hrr_unbind,
    key_to_conv1d_weight,
)
from manynets.layers.binding import (
    HRRBinding,
    LearnedUnbinding,
    MBATBinding,
    SumBinding,
    bind_regularization,
    repeated_slot_sum,
)
from manynets.layers.isometry import conv_isometry_penalty, isometry_regularization


def circular_convolution_loop(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    c = len(a)
    return np.array([sum(a[t] * k[(m - t) % c] for t in range(c)) for m in range(c)])


@pytest.mark.parametrize("method", ["fft", "matmul", "auto"])
def test_binding_equals_direct_circular_convolution(method):
    rng = np.random.default_rng(0)
    g, n, c, h, w = 2, 3, 8, 2, 3
    x, keys = rng.normal(size=(g, n, c, h, w)), rng.normal(size=(n, c))
    out = hrr_bind_bundle(torch.from_numpy(x), torch.from_numpy(keys), method).numpy()
    ref = np.zeros((g, c, h, w))
    for gi in range(g):
        for j in range(n):
            for hi in range(h):
                for wi in range(w):
                    ref[gi, :, hi, wi] += circular_convolution_loop(x[gi, j, :, hi, wi], keys[j])
    assert np.abs(out - ref).max() < 1e-10
    single = hrr_bind(torch.from_numpy(x[0, 0, :, 0, 0]), torch.from_numpy(keys[0])).numpy()
    assert np.abs(single - circular_convolution_loop(x[0, 0, :, 0, 0], keys[0])).max() < 1e-10


@pytest.mark.parametrize("method", ["fft", "matmul", "auto"])
def test_vector_binding_equals_direct_circular_convolution_and_one_pixel_maps(method):
    """Vector features (G, n, C) (an MLP stem): bound along the feature axis, summed over slots."""
    rng = np.random.default_rng(1)
    g, n, c = 3, 2, 10
    x, keys = rng.normal(size=(g, n, c)), rng.normal(size=(n, c))
    out = hrr_bind_bundle(torch.from_numpy(x), torch.from_numpy(keys), method)
    ref = np.array([sum(circular_convolution_loop(x[gi, j], keys[j]) for j in range(n)) for gi in range(g)])
    assert out.shape == (g, c) and np.abs(out.numpy() - ref).max() < 1e-10
    as_maps = hrr_bind_bundle(torch.from_numpy(x)[..., None, None], torch.from_numpy(keys), method)
    assert as_maps.shape == (g, c, 1, 1) and np.abs(as_maps[..., 0, 0].numpy() - ref).max() < 1e-10
    xt = torch.from_numpy(x).requires_grad_()
    kt = torch.from_numpy(keys).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: hrr_bind_bundle(a, b, method), (xt, kt))


def test_binding_layers_take_vectors_as_one_pixel_maps():
    torch.manual_seed(0)
    capacity, n, c = 4, 2, 6
    v = torch.randn(3, n, c, dtype=torch.float64)
    repeated = v.repeat(1, capacity // n, 1)  # slot j holds image j mod n
    hrr, mbat = HRRBinding(capacity, c).double(), MBATBinding(capacity, c).double()
    keys, weight = hrr.keys.detach().numpy(), mbat.weight.detach()
    direct = sum(np.apply_along_axis(circular_convolution_loop, 1, repeated[:, j].numpy(), keys[j])
                 for j in range(capacity))
    assert np.abs(hrr(v).detach().numpy() - direct).max() < 1e-10
    assert torch.allclose(mbat(v), sum(repeated[:, j] @ weight[j].T for j in range(capacity)), atol=1e-12)
    assert torch.allclose(SumBinding(capacity, c)(v), repeated.sum(1))
    for layer in (hrr, mbat, SumBinding(capacity, c)):
        assert torch.allclose(layer(v), layer(v[..., None, None])[..., 0, 0], atol=1e-12)
    with pytest.raises(ValueError, match=r"\(groups, n, 6, H, W\) or vectors \(groups, n, 6\), got \(3, 2, 6, 5\)"):
        hrr(torch.randn(3, n, c, 5, dtype=torch.float64))


@pytest.mark.parametrize("c", [4, 16])
def test_official_grouped_conv1d_equals_fft_with_reversed_rolled_key(c):
    """The official Conv1d computes out[m] = sum_j x[j] w[(j - m - 1 + C/2) mod C] (spec §1.2)."""
    rng = np.random.default_rng(c)
    g, n, h, w = 2, 3, 2, 2
    x, weight = rng.normal(size=(g, n, c, h, w)), rng.normal(size=(n, 1, c))
    conv = grouped_conv1d_bind(torch.from_numpy(x), torch.from_numpy(weight)).numpy()
    direct = np.zeros_like(x)
    for j in range(n):
        for m in range(c):
            direct[:, j, m] = sum(x[:, j, t] * weight[j, 0, (t - m - 1 + c // 2) % c] for t in range(c))
    assert np.abs(conv - direct).max() < 1e-10
    for method in ("fft", "matmul"):
        ours = hrr_bind_bundle(torch.from_numpy(x), conv1d_weight_to_key(torch.from_numpy(weight[:, 0])), method).numpy()
        assert np.abs(ours - conv.sum(1)).max() < 1e-10
    k = torch.from_numpy(weight[:, 0])
    assert torch.equal(key_to_conv1d_weight(conv1d_weight_to_key(k)), k)  # an involution


def test_odd_key_length_is_rejected():
    with pytest.raises(ValueError, match="must be even"):
        conv1d_weight_to_key(torch.zeros(3, 5))


def test_unitary_keys_invert_exactly():
    c = 64
    phases = torch.rand(c // 2 + 1, dtype=torch.float64) * 2 * torch.pi
    phases[0] = 0.0
    phases[-1] = 0.0  # real DC and Nyquist bins
    key = torch.fft.irfft(torch.polar(torch.ones_like(phases), phases), n=c)
    assert torch.allclose(torch.fft.rfft(key).abs(), torch.ones(c // 2 + 1, dtype=torch.float64))
    x = torch.randn(5, c, dtype=torch.float64)
    assert (hrr_unbind(hrr_bind(x, key), key) - x).abs().max() < 1e-12


@pytest.mark.parametrize("n, expected", [(1, 0.70), (2, 0.58), (4, 0.44)])
def test_random_key_unbinding_similarity(n, expected):
    """cos(unbind(sum of n bound vectors), x0) with N(0, 1/C) keys, C = 512 (spec §1.9, 50 trials)."""
    gen = torch.Generator().manual_seed(n)
    c, cos = 512, []
    for _ in range(50):
        x = torch.randn(n, c, generator=gen, dtype=torch.float64)
        keys = torch.randn(n, c, generator=gen, dtype=torch.float64) / c**0.5
        s = hrr_bind(x, keys).sum(0)
        cos.append(torch.cosine_similarity(hrr_unbind(s, keys[0]), x[0], dim=0).item())
    assert np.mean(cos) == pytest.approx(expected, abs=0.04)


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_custom_op_gradients_and_registration(method):
    x = torch.randn(2, 3, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hrr_bind_bundle(a, b, method), (x, keys))
    # fake (meta) impl, autograd registration and schema; the aot_dispatch checks compile, too slow here
    if method == "matmul":  # the schema, fake impl and autograd registration are shared by both methods
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(hrr_bind_bundle, (x, keys, method), test_utils=checks)
        torch.library.opcheck(hrr_bind_bundle, (x[..., 0, 0], keys, method), test_utils=checks)  # vectors
    with pytest.raises(ValueError, match="method='dft'"):
        hrr_bind_bundle(x, keys, "dft")
    with pytest.raises(ValueError, match=r"keys \(n, C\)"):
        hrr_bind_bundle(torch.zeros(1, 2, 4, 1, 1), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"or \(G, n, C\)"):
        hrr_bind_bundle(torch.zeros(2, 4), torch.zeros(2, 4))


def test_slot_repetition_equals_binding_repeated_images():
    """n < N: slot j holds image j mod n; binding folds the repeated slots' keys (spec §1.5)."""
    torch.manual_seed(0)
    capacity, n, c = 4, 2, 8
    x = torch.randn(3, n, c, 2, 2, dtype=torch.float64)
    repeated = x.repeat(1, capacity // n, 1, 1, 1)  # (G, N, ...), slot j = image j mod n
    hrr = HRRBinding(capacity, c).double()
    ref = sum(
        torch.from_numpy(np.apply_along_axis(circular_convolution_loop, 1, repeated[:, j].numpy(), hrr.keys[j].detach().numpy()))
        for j in range(capacity)
    )
    assert (hrr(x) - ref).abs().max() < 1e-10
    assert torch.equal(repeated_slot_sum(torch.arange(4.0)[:, None], 2).flatten(), torch.tensor([2.0, 4.0]))
    assert torch.allclose(SumBinding(capacity, c)(x), repeated.sum(1))
    with pytest.raises(ValueError, match="does not divide the capacity N=4"):
        hrr(torch.randn(1, 3, c, 2, 2, dtype=torch.float64))


def test_mbat_equals_official_grouped_1x1_conv():
    torch.manual_seed(0)
    capacity, c = 3, 5
    mbat = MBATBinding(capacity, c).double()
    conv = nn.Conv2d(capacity * c, capacity * c, 1, groups=capacity, bias=False).double()
    conv.weight.data = mbat.weight.detach().reshape(capacity * c, c, 1, 1).clone()
    x = torch.randn(2, capacity, c, 3, 3, dtype=torch.float64)
    official = conv(x.reshape(2, capacity * c, 3, 3)).reshape(2, capacity, c, 3, 3).sum(1)
    assert (mbat(x) - official).abs().max() < 1e-12
    assert mbat.regularization().item() == 0.0  # R_bind is for HRR keys only


def test_hrr_keys_frozen_and_init_range():
    hrr = HRRBinding(4, 64, trainable=False)
    assert not hrr.keys.requires_grad and hrr.keys.abs().max() <= 1 / 8


def test_learned_unbinding_averages_repeated_slots():
    torch.manual_seed(0)
    d, capacity, n, g = 6, 4, 2, 3
    unbind = LearnedUnbinding(d, capacity).double()
    f = torch.randn(g, d, dtype=torch.float64)
    out = unbind(f, n)
    assert out.shape == (g * n, d)
    w, b = unbind.linear.weight.detach(), unbind.linear.bias.detach()
    for gi in range(g):
        for i in range(n):
            copies = [torch.relu(w[j * d : (j + 1) * d] @ f[gi] + b[j * d : (j + 1) * d]) for j in range(i, capacity, n)]
            assert torch.allclose(out[gi * n + i], torch.stack(copies).mean(0))


def bind_reg_reference(k: np.ndarray) -> float:
    n = len(k)
    norms = np.linalg.norm(k, axis=1)
    unit = k / norms[:, None]
    off = sum((unit[i] @ unit[j]) ** 2 for i in range(n) for j in range(i + 1, n))
    return (off / (n * (n - 1) / 2) if n > 1 else 0.0) + ((norms - 1) ** 2).sum() / n


def test_bind_regularization():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    ortho = torch.from_numpy(q[:4])
    assert bind_regularization(ortho).item() < 1e-12
    keys = rng.normal(size=(4, 16))
    value = bind_regularization(torch.from_numpy(keys)).item()
    assert value == pytest.approx(bind_reg_reference(keys), rel=1e-10) and value > 0
    flipped = keys[[2, 0, 3, 1]] * np.array([[1], [-1], [-1], [1]])
    assert bind_regularization(torch.from_numpy(flipped)).item() == pytest.approx(value, rel=1e-10)
    assert bind_regularization(torch.from_numpy(keys[:1])).item() == pytest.approx(bind_reg_reference(keys[:1]))


def isometry_reference(w: np.ndarray, stride: int) -> float:
    """Direct loops: Gram of the (transposed if Ci < Co) conv with itself, minus I at the centre."""
    if w.shape[1] < w.shape[0]:
        w = w.transpose(1, 0, 2, 3)
    co, ci, k, _ = w.shape
    pad = np.zeros((co, ci, 3 * k - 2, 3 * k - 2))
    pad[:, :, k - 1 : 2 * k - 1, k - 1 : 2 * k - 1] = w
    m = (2 * k - 2) // stride + 1
    total = 0.0
    for a in range(co):
        for b in range(co):
            for u in range(m):
                for v in range(m):
                    gram = (pad[a, :, u * stride : u * stride + k, v * stride : v * stride + k] * w[b]).sum()
                    target = float(a == b and u == m // 2 and v == m // 2)
                    total += (gram - target) ** 2
    return 0.5 * total


@pytest.mark.parametrize("shape, stride", [((4, 4, 3, 3), 1), ((6, 3, 3, 3), 2), ((3, 5, 3, 3), 2), ((6, 3, 1, 1), 2)])
def test_isometry_penalty_matches_loops(shape, stride):
    w = np.random.default_rng(sum(shape)).normal(size=shape) * 0.3
    got = conv_isometry_penalty(torch.from_numpy(w), stride).item()
    assert got == pytest.approx(isometry_reference(w, stride), rel=1e-10)


def test_isometry_zero_for_dirac_conv():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight)
    other = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    assert isometry_regularization([conv]).item() == 0.0
    assert isometry_regularization([conv, other]).item() == pytest.approx(conv_isometry_penalty(other.weight).item())


@pytest.mark.parametrize("kind", ["hrr", "mbat", "none", "hrr_fft"])
def test_bind_stacked_is_one_matrix_over_the_stacked_slots(kind):
    """``bind_stacked`` of groups stored (G, n·C, P) equals the binding of (G, n, C, H, W), with and
    without ``out``, at every n; HRR from MATMUL_MAX_CHANNELS channels has no matrix (its FFT path)."""
    torch.manual_seed(0)
    capacity, c = 4, (MATMUL_MAX_CHANNELS if kind == "hrr_fft" else 6)
    layer = {"hrr": HRRBinding, "hrr_fft": HRRBinding, "mbat": MBATBinding, "none": SumBinding}[kind](capacity, c)
    layer = layer.double()
    for n in (1, 2, 4):
        x = torch.randn(3, n, c, 2, 3, dtype=torch.float64)
        ref = layer(x)
        if kind == "hrr":  # the slot sum of circulant products, built independently of circulant()
            keys = repeated_slot_sum(layer.keys.detach(), n)
            idx = (torch.arange(c)[:, None] - torch.arange(c)[None, :]) % c
            direct = sum(torch.einsum("mt,gthw->gmhw", keys[j][idx], x[:, j]) for j in range(n))
            assert torch.allclose(ref, direct, atol=1e-12)
        assert (layer.stacked_matrix(n) is None) == (kind == "hrr_fft")
        stacked = x.reshape(3, n * c, 6)
        out = torch.full((5, c, 6), float("nan"), dtype=torch.float64)
        assert torch.allclose(layer.bind_stacked(stacked, n).view_as(ref), ref, atol=1e-12)
        with torch.no_grad():  # out= takes no autograd (torch raises)
            layer.bind_stacked(stacked, n, out=out[1:4])
        assert torch.allclose(out[1:4].view_as(ref), ref, atol=1e-12) and out[0].isnan().all()

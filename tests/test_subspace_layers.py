"""Subspace layers, conversion, cos^2 and BN recompute against spec §3.6 with independent references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manynets.analysis.bn_recompute import collect_bn_statistics, recompute_bn
from manynets.layers.subspace import (
    SubspaceBatchNorm2d,
    SubspaceConv2d,
    combined_parameters,
    cosine_similarity_squared,
    midpoint,
    sample_coefficients,
    set_point,
    subspace_coefficients,
    subspace_layers,
    to_subspace,
)
from manynets.layers.subspace_bn import (
    bn_layers,
    check_packed,
    load_bn_statistics,
    packed_logits,
)
from manynets.networks import MLP, CifarResNet


pytestmark = pytest.mark.usefixtures("one_thread")


def small_resnet(**kw):
    return CifarResNet(10, (3, 8, 8), depth=8, width=4, **kw)


class LinearBN(nn.Module):
    """Linear + BatchNorm1d net with the seams (exercises the packed Linear and BN1d paths)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU())
        self.pool = nn.Identity()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))))


def test_line_and_curve_endpoints_and_midpoints():
    conv = SubspaceConv2d(3, 4, 3, padding=1, bias=True, num_sets=3)
    for w in conv.parameter_sets("weight") + conv.parameter_sets("bias"):
        nn.init.normal_(w)
    w0, w1, w2 = [w.detach().numpy() for w in conv.parameter_sets("weight")]
    x = torch.randn(2, 3, 5, 5)
    # curve endpoints: theta(0) = theta0, theta(1) = theta1 (weight1 is the far end, spec 3.1)
    for alpha, ref in ((0.0, 0), (1.0, 1)):
        conv.set_coefficients(subspace_coefficients("curve", alpha))
        expected = F.conv2d(x, conv.parameter_sets("weight")[ref], conv.parameter_sets("bias")[ref], padding=1)
        torch.testing.assert_close(conv(x), expected)
    # curve midpoint = 1/4 theta0 + 1/2 theta2 + 1/4 theta1; general alpha by de Casteljau
    conv.set_coefficients(subspace_coefficients("curve", 0.5))
    np.testing.assert_allclose(conv.point_parameter("weight")[0].detach().numpy(), w0 / 4 + w2 / 2 + w1 / 4, atol=1e-6)
    a = 0.3
    casteljau = (1 - a) * ((1 - a) * w0 + a * w2) + a * ((1 - a) * w2 + a * w1)
    conv.set_coefficients(subspace_coefficients("curve", a))
    np.testing.assert_allclose(conv.point_parameter("weight")[0].detach().numpy(), casteljau, atol=1e-6)
    # line midpoint for conv weights and BN gamma/beta
    bn = SubspaceBatchNorm2d(4, num_sets=2)
    for w in bn.parameter_sets("weight") + bn.parameter_sets("bias"):
        nn.init.normal_(w)
    bn.set_coefficients(subspace_coefficients("line", 0.5))
    for name in ("weight", "bias"):
        g0, g1 = [t.detach().numpy() for t in bn.parameter_sets(name)]
        np.testing.assert_allclose(bn.point_parameter(name)[0].detach().numpy(), (g0 + g1) / 2, atol=1e-6)
    bn.set_coefficients(subspace_coefficients("line", 1.0))
    bn.eval()
    y = torch.randn(3, 4, 2, 2)
    ref = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight1, bn.bias1, False, 0.0, bn.eps)
    torch.testing.assert_close(bn(y), ref)


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_simplex_coefficients(k):
    t = sample_coefficients("simplex", k, 4000)
    assert t.shape == (4000, k) and (t >= 0).all()
    torch.testing.assert_close(t.sum(-1), torch.ones(4000))
    assert t.mean(0).sub(1 / k).abs().max() < 0.02  # Dirichlet(1): E[t_i] = 1/k
    torch.testing.assert_close(midpoint("simplex", k), torch.eye(k).mean(0))  # centroid = vertex mean
    alphas = sample_coefficients("line", None, 1000)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(1000))
    assert alphas.min() >= 0


def test_bad_points_and_kinds_raise():
    with pytest.raises(ValueError, match="num_vertices=10"):
        subspace_coefficients("simplex", torch.ones(10) / 10, 10)
    with pytest.raises(ValueError, match="summing to 1"):
        subspace_coefficients("simplex", torch.tensor([0.5, 0.6, 0.1]), 3)
    with pytest.raises(ValueError, match=r"alpha=1.5"):
        subspace_coefficients("line", 1.5)
    with pytest.raises(ValueError, match="kind='plane'"):
        to_subspace(small_resnet(), "plane")
    net = to_subspace(small_resnet(), "line")
    with pytest.raises(ValueError, match="already has subspace layers"):
        to_subspace(net, "line")


def _vector(net, s):
    return np.concatenate([
        layer.parameter_sets("weight")[s].detach().numpy().ravel()
        for layer in subspace_layers(net) if not isinstance(layer, nn.modules.batchnorm._BatchNorm)
    ])  # fmt: skip


def test_cos2_matches_numpy_in_unit_interval_and_scale_invariant():
    net = to_subspace(small_resnet(), "simplex", 3)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        vi, vj = _vector(net, i), _vector(net, j)
        ref = np.dot(vi, vj) ** 2 / (np.dot(vi, vi) * np.dot(vj, vj))
        got = cosine_similarity_squared(net, i, j).item()
        assert got == pytest.approx(ref, rel=1e-4) and 0 <= got <= 1
    with torch.no_grad():  # make the sets correlated so the value is not ~0
        for layer in subspace_layers(net):
            layer.weight1.copy_(layer.weight + 0.5 * layer.weight1)
    before = cosine_similarity_squared(net, 0, 1).item()
    assert 0.3 < before < 1
    with torch.no_grad():
        for layer in subspace_layers(net):
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.weight1.mul_(7.5)  # scale ALL of one endpoint by one number
    assert cosine_similarity_squared(net, 0, 1).item() == pytest.approx(before, rel=1e-5)
    with torch.no_grad():
        net.head.weight1.mul_(50.0)  # per-layer scaling changes it (spec 3.6 caveat)
    assert cosine_similarity_squared(net, 0, 1).item() != pytest.approx(before, rel=1e-3)
    identical = to_subspace(small_resnet(), "line")
    with torch.no_grad():
        for layer in subspace_layers(identical):
            layer.weight1.copy_(-2 * layer.weight)
    assert cosine_similarity_squared(identical, 0, 1).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("make", [small_resnet, lambda: MLP(10, (3, 8, 8), depth=2, width=16), LinearBN])
@pytest.mark.parametrize("kind,k", [("line", None), ("curve", None), ("simplex", 4)])
def test_conversion_keeps_output_at_theta0(make, kind, k):
    torch.manual_seed(3)
    original = make()
    converted = make()
    converted.load_state_dict(original.state_dict())
    to_subspace(converted, kind, k)
    x = torch.randn(5, 3, 8, 8) if not isinstance(original, LinearBN) else torch.randn(5, 12)
    for train in (True, False):
        original.train(train)
        converted.train(train)
        torch.testing.assert_close(converted(x), original(x))
    # every Conv2d / Linear / BN of stem, body and head is converted; extra sets are independent
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert isinstance(converted.head, nn.Linear) and len(subspace_layers(converted.stem)) >= 1
    first = subspace_layers(converted)[0]
    assert not torch.equal(first.weight, first.weight1)


def test_conversion_with_an_init_callable_draws_each_set_from_a_copy():
    """A callable init (a backbone's ``init_weights``) gets a copy of each original layer, once per extra
    set, one layer at a time; set 0 stays the original parameters."""
    net = small_resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kept = list(net.modules())  # alive, so no copy can reuse one of their ids
    originals = {id(m) for m in kept}
    calls = []

    def init(module):
        assert id(module) not in originals and not list(module.children())  # a copy of one layer
        calls.append(type(module))
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float(len(calls)))
        return module

    to_subspace(net, "curve", init=init)
    layers = subspace_layers(net)
    assert len(calls) == 2 * len(layers)
    firsts = set()
    for layer in layers:  # sets 1 and 2 of a layer come from two consecutive calls on its copy
        first = layer.weight1.flatten()[0].item()
        assert first % 2 == 1 and first not in firsts
        firsts.add(first)
        for name in layer._subspace_names:
            assert torch.equal(getattr(layer, f"{name}1"), torch.full_like(getattr(layer, name), first))
            assert torch.equal(getattr(layer, f"{name}2"), torch.full_like(getattr(layer, name), first + 1))
    for key, value in net.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key
    fresh = to_subspace(small_resnet(), "line")
    assert torch.equal(fresh.stem[1].weight1, torch.ones(4)) and torch.equal(fresh.stem[1].bias1, torch.zeros(4))
    std = fresh.body[0].conv1.weight1.std().item()  # kaiming fan_in: std = sqrt(2 / (4 * 9))
    assert std == pytest.approx((2 / 36) ** 0.5, rel=0.3)
    recipe = small_resnet()
    by_backbone = to_subspace(recipe, "line", init=recipe.init_weights)  # CifarResNet: Kaiming fan_in too
    assert by_backbone.body[0].conv1.weight1.std().item() == pytest.approx((2 / 36) ** 0.5, rel=0.3)
    assert torch.equal(by_backbone.stem[1].weight1, torch.ones(4))


def test_float64_network_gets_float64_points():
    """Coefficients in the parameters' dtype: the point equals a float64 NumPy computation to 1e-15."""
    net = to_subspace(small_resnet().double(), "curve")
    layer = net.body[0].conv1
    assert layer.weight2.dtype == torch.float64 and layer.coefficients.dtype == torch.float64
    alpha = 0.3
    set_point(net, subspace_coefficients("curve", alpha, dtype=torch.float64))
    w0, w1, w2 = [w.detach().numpy() for w in layer.parameter_sets("weight")]
    ref = (1 - alpha) ** 2 * w0 + alpha**2 * w1 + 2 * alpha * (1 - alpha) * w2
    np.testing.assert_allclose(layer.point_parameter("weight")[0].detach().numpy(), ref, rtol=0, atol=1e-15)
    c = sample_coefficients("simplex", 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    again = sample_coefficients("simplex", 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert c.dtype == torch.float64 and torch.equal(c, again)
    np.testing.assert_allclose(c.sum(-1).numpy(), 1.0, rtol=0, atol=1e-15)


def _data(n_batches=4, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 8, 8, generator=g) * 2 + 1 for _ in range(n_batches)]


def test_recompute_bn_is_mean_of_batch_means():
    net = to_subspace(small_resnet(), "line")
    batches = _data()
    inputs = {}
    bn = net.body[1].bn1
    hook = bn.register_forward_hook(lambda m, i, o: inputs.setdefault("x", []).append(i[0].detach().clone()))
    bn.momentum = 0.3
    recompute_bn(net, batches, subspace_coefficients("line", 0.3))
    hook.remove()
    means = torch.stack([x.mean((0, 2, 3)) for x in inputs["x"]])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs["x"]])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and net.training  # momentum and mode restored


@pytest.mark.parametrize("kind,k,chunk", [("line", None, None), ("curve", None, 2), ("simplex", 3, 3)])
def test_multi_point_recompute_equals_one_pass_per_point(kind, k, chunk):
    torch.manual_seed(1)
    net = to_subspace(small_resnet(), kind, k)
    points = subspace_coefficients(kind, torch.linspace(0, 1, 5)) if k is None else sample_coefficients(kind, k, 5)
    batches = _data()
    stats = collect_bn_statistics(net, batches, points, chunk_size=chunk)
    x = torch.randn(7, 3, 8, 8)
    logits, features = packed_logits(net, x, points, stats)
    for i, c in enumerate(points):
        recompute_bn(net, batches, c)
        for name, m in bn_layers(net):
            torch.testing.assert_close(stats[name][0][i], m.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stats[name][1][i], m.running_var, rtol=1e-4, atol=1e-5)
        net.eval()
        torch.testing.assert_close(logits[i], net(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(features[i], net.features(x), rtol=1e-4, atol=1e-4)
        net.train()
    before = net.body[0].bn1.running_mean.clone()
    load_bn_statistics(net, stats, 2)
    torch.testing.assert_close(net.body[0].bn1.running_mean, stats["body.0.bn1"][0][2])
    assert not torch.equal(before, net.body[0].bn1.running_mean)


def test_packed_linear_bn1d_and_layerwise_rows():
    net = to_subspace(LinearBN(), "line")
    batches = [torch.randn(8, 12) for _ in range(3)]
    points = subspace_coefficients("line", torch.tensor([0.0, 0.4, 1.0]))
    stats = collect_bn_statistics(net, batches, points)
    x = torch.randn(4, 12)
    logits, _ = packed_logits(net, x, points, stats)
    for i, c in enumerate(points):
        recompute_bn(net, batches, c)
        net.eval()
        torch.testing.assert_close(logits[i], net(x), rtol=1e-4, atol=1e-5)
        net.train()


def test_check_packed_rejects_channel_structured_modules():
    net = to_subspace(small_resnet(shortcut="pad"), "line")
    points = subspace_coefficients("line", torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="points_per_pass=1"):
        check_packed(net, torch.randn(4, 3, 8, 8), points)
    check_packed(to_subspace(small_resnet(), "line"), torch.randn(4, 3, 8, 8), points)  # conv shortcut is fine


def test_set_point_and_gradients_reach_every_set():
    net = to_subspace(small_resnet(), "simplex", 3)
    set_point(net, torch.tensor([0.2, 0.3, 0.5]))
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    for layer in subspace_layers(net):
        for name in ("weight", "weight1", "weight2"):
            assert getattr(layer, name).grad is not None and getattr(layer, name).grad.abs().sum() > 0


def _reference_cos2(layers, i, j):
    """cos² from per-layer sums, differentiated by autograd (the previous formulation)."""
    dots, ni, nj = [], [], []
    for layer in layers:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue
        wi, wj = layer.parameter_sets("weight")[i], layer.parameter_sets("weight")[j]
        dots.append((wi * wj).sum())
        ni.append(wi.pow(2).sum())
        nj.append(wj.pow(2).sum())
    return torch.stack(dots).sum().pow(2) / (torch.stack(ni).sum() * torch.stack(nj).sum())


@pytest.mark.parametrize("kind,k", [("line", None), ("curve", None), ("simplex", 4)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_combined_parameters_give_the_per_layer_loss_and_gradients(kind, k, layerwise):
    """All layers combined at once (foreach ops) + closed-form cos² gradient == each layer combining its
    own sets + autograd through per-layer sums: same loss and vertex gradients (float32 rounding)."""
    torch.manual_seed(4)
    net = to_subspace(small_resnet(), kind, k)
    layers = subspace_layers(net)
    points = sample_coefficients(kind, k, len(layers) if layerwise else 1)
    for i, layer in enumerate(layers):
        layer.coefficients = points[i : i + 1] if layerwise else points
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    s = layers[0].num_sets

    def loss_and_grads(combined: bool):
        net.zero_grad()
        if combined:
            with combined_parameters(layers):
                ce = F.cross_entropy(net(x), y)
            cos2 = cosine_similarity_squared(layers, 0, s - 1)
        else:
            ce, cos2 = F.cross_entropy(net(x), y), _reference_cos2(layers, 0, s - 1)
        (ce + cos2).backward()
        return ce.detach(), cos2.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    ce_ref, cos_ref, grads_ref = loss_and_grads(False)
    ce, cos2, grads = loss_and_grads(True)
    assert all(layer._combined is None for layer in layers)  # the block leaves nothing behind
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(cos2, cos_ref, rtol=1e-5, atol=1e-9)
    assert grads.keys() == grads_ref.keys() and any(n.endswith("weight2") or n.endswith("weight1") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-6 * grads_ref[name].abs().max().item())
    if kind == "line" and not layerwise:  # the default: one foreach lerp, the same kernel as torch.lerp
        net.zero_grad()
        with combined_parameters(layers):
            F.cross_entropy(net(x), y).backward()
        exact = {n: p.grad.clone() for n, p in net.named_parameters()}
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        assert all(torch.equal(exact[n], p.grad) for n, p in net.named_parameters())

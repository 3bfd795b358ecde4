"""``Backbone.init_weights``: fresh backbones draw what they drew before the seam refactor, and a copied
stem or head is re-drawn with the backbone's own recipe (checked against the recipe's formula)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from manynets.layers.pi_optim import PiSGD
from manynets.networks import MLP, VGG, CifarResNet, PiMLP, PreActResNet, ResNet, WideResNet
from manynets.networks.wide_resnet import TRUNC_NORMAL_2SIGMA_STD, WideBlock

# Built under torch.manual_seed(0) by the backbones as they were before Backbone.init_weights existed
# (commit e812688): sum and sum of squares of the state dict in float64, and the next global draw
# (which also checks the number of draws).
FRESH = {
    "wrn_default": (WideResNet, dict(depth=10, width=1), (462.8317659402407, 934.0508907920085, 0.9910293817520142)),
    "wrn_mixmo": (WideResNet, dict(depth=10, width=1, init="mixmo", stride_on="conv2", strided_conv_padding="tf"),
                  (530.6757891958578, 1175.5301352700062, -1.2190513610839844)),
    "wrn_mimonet": (WideResNet, dict(depth=10, width=1, initial_width=2, activation="prelu", stem_norm_act=True,
                                     shortcut_norm=True, final_norm_act=False),
                    (759.8245703110767, 1274.920625586457, -1.1760642528533936)),
    "wrn_slope": (WideResNet, dict(depth=10, width=1, init_slope=0.5, activation="prelu"),
                  (624.0019854519908, 913.9542373508943, -0.06340759992599487)),
    "wrn_iso": (WideResNet, dict(depth=10, width=1, activation="srelu", dirac_init=True, skip_init=True),
                (464.2066101010423, 953.5073584078021, 0.9910293817520142)),
    "wrn_mixmo_slope_dirac": (WideResNet, dict(depth=10, width=1, init="mixmo", init_slope=0.3, dirac_init=True),
                              (705.2422999863193, 755.8125346333396, -1.2190513610839844)),
    "preact_default": (PreActResNet, dict(depth=18, width=1),
                       (7707.778425811329, 15504.698285194594, -1.1828618049621582)),
    "preact_mixmo": (PreActResNet, dict(depth=18, width=1, init="mixmo", stem_stride=2, final_norm_act=False),
                     (6670.146416174045, 16405.37650777374, -0.960518479347229)),
    "resnet_default": (ResNet, dict(depth=18, width_divisor=8),
                       (1209.5740226658177, 2169.5435542506048, 0.8628084063529968)),
    "resnet_fanin": (ResNet, dict(depth=18, width_divisor=8, stem="cifar", head_bias=False, init="kaiming_fan_in"),
                     (1139.3353397247138, 2419.426912704647, -1.5248645544052124)),
    "resnet_noskip": (ResNet, dict(blocks=(1, 1, 1, 1), width_divisor=8, skip=False),
                      (481.79221607681086, 874.9958424313413, 1.4350701570510864)),
    "cifar_default": (CifarResNet, dict(depth=8, width=4),
                      (152.36467381052353, 352.4062672940142, -1.1995536088943481)),
    "cifar_pad": (CifarResNet, dict(depth=8, width=4, shortcut="pad", head_bias=True, init="kaiming_fan_out"),
                  (114.62909431032313, 217.2306526619111, -0.2559276223182678)),
    "vgg_phdlab": (VGG, dict(depth=11, width_divisor=16), (445.097312378914, 725.1251248576284, 1.1325361728668213)),
    "vgg_linear": (VGG, dict(depth=11, width_divisor=16, head="linear"),
                   (352.92162763505394, 628.203759602847, 1.358429193496704)),
    "mlp": (MLP, dict(depth=2, width=16, image_shape=(1, 4, 4)),
            (-1.3111569583415985, 15.323432016951479, 0.5555914044380188)),
    "mlp_nobias": (MLP, dict(depth=1, width=8, image_shape=(1, 4, 4), bias=False),
                   (-3.233407501131296, 6.084912740865101, -2.502300977706909)),
    # the former InfMLP(16, 3, ...) and FinPiMLP(16, 3, ...) with the same options (output sum on a fixed input last)
    "pimlp_infinite": (PiMLP, dict(image_shape=(1, 4, 4), r=5, depth=3, seed=0, readout_zero_init=False,
                                   first_layer_alpha=0.7, last_layer_alpha=0.5, bias_alpha=0.5),
                       (12.399277207267005, 44.71324541390062, 1.5409960746765137, 0.012373104733342188)),
    "pimlp_mu": (PiMLP, dict(image_shape=(1, 4, 4), r=5, depth=2, width=32, gaussian_init=True, gproj=False, seed=2,
                             first_layer_alpha=0.7, last_layer_alpha=0.5, bias_alpha=0.5),
                 (-19.21385245618876, 455.110548705778, -1.129451036453247, 0.23725741356611252)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FRESH))
def test_fresh_backbones_draw_what_they_drew_before(name: str) -> None:
    cls, kwargs, expected = FRESH[name]
    torch.manual_seed(0)
    net = cls(3 if cls is PiMLP else 10, **kwargs)
    got = [float(sum(v.double().sum() for v in net.state_dict().values())),
           float(sum(v.double().square().sum() for v in net.state_dict().values())), torch.randn(()).item()]
    if cls is PiMLP:
        with torch.no_grad():
            got.append(float(net(torch.linspace(-1, 1, 32).reshape(2, 16)).double().sum()))
    # Draws are bit-exact; what is computed from them in float32 (the μ-net's scaled projections, the π-net's
    # forward) rounds differently on CPUs with other SIMD widths (measured: 7e-10 in the state sums, 8e-7 in
    # the output), far below what another init recipe or draw order would change.
    assert got[:3] == pytest.approx(list(expected[:3]), rel=1e-8, abs=1e-12)
    assert got[3:] == pytest.approx(list(expected[3:]), rel=1e-5, abs=1e-12)


def redraw(net: nn.Module, part: nn.Module, seed: int = 1) -> nn.Module:
    """``net.init_weights`` on a perturbed deep copy of ``part``, under ``torch.manual_seed(seed)``."""
    part = copy.deepcopy(part)
    with torch.no_grad():
        for t in [*part.parameters(), *part.buffers()]:
            if t.is_floating_point():
                t.add_(3.0)
    torch.manual_seed(seed)
    return net.init_weights(part)


def expected_draws(seed: int, *draws):
    """Draw ``fn(empty_like(t))`` for each (t, fn) in order under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return [fn(torch.empty_like(t)) for t, fn in draws]


def test_copied_heads_and_stems_follow_the_recipe() -> None:
    # PreActResNet mixmo: head N(0, 0.01), bias 0 (MixMo's Tiny ImageNet recipe)
    pre = PreActResNet(20, width=1, init="mixmo")
    head = redraw(pre, pre.head)
    [w] = expected_draws(1, (head.weight, lambda t: t.normal_(0.0, 0.01)))
    assert torch.equal(head.weight, w) and torch.all(head.bias == 0)
    # WideResNet mixmo: stem conv He fan_in truncated at ±2σ, σ = sqrt(2 / fan_in) / 0.8796; head the same
    wrn = WideResNet(10, depth=10, width=1, init="mixmo")
    stem, head = redraw(wrn, wrn.stem), redraw(wrn, wrn.head)
    std_conv, std_lin = math.sqrt(2 / (3 * 9)) / TRUNC_NORMAL_2SIGMA_STD, math.sqrt(2 / 64) / TRUNC_NORMAL_2SIGMA_STD
    [w] = expected_draws(1, (stem[0].weight, lambda t: nn.init.trunc_normal_(t, 0, std_conv, -2 * std_conv,
                                                                              2 * std_conv)))  # fmt: skip
    assert torch.equal(stem[0].weight, w)
    [w] = expected_draws(1, (head.weight, lambda t: nn.init.trunc_normal_(t, 0, std_lin, -2 * std_lin, 2 * std_lin)))
    assert torch.equal(head.weight, w) and torch.all(head.bias == 0)
    # WideResNet kaiming_fan_out with a conv-BN-ReLU stem: conv N(0, 2 / fan_out), BN back to 1/0 and fresh stats
    mimo = WideResNet(10, depth=10, width=1, stem_norm_act=True, initial_width=2)
    stem = redraw(mimo, mimo.stem)
    [w] = expected_draws(1, (stem[0].weight, lambda t: t.normal_(0.0, math.sqrt(2 / (32 * 9)))))
    assert torch.equal(stem[0].weight, w)
    bn = stem[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and torch.all(bn.running_mean == 0)
    assert torch.all(bn.running_var == 1)
    # ResNet kaiming_fan_in (subspaces): head N(0, 2 / fan_in); MLP / kaiming_fan_out heads: PyTorch's default
    res = ResNet(10, width_divisor=8, init="kaiming_fan_in", head_bias=False)
    head = redraw(res, res.head)
    [w] = expected_draws(1, (head.weight, lambda t: t.normal_(0.0, math.sqrt(2 / 64))))
    assert torch.equal(head.weight, w)
    for net in (MLP(10, (1, 4, 4), depth=1, width=8), CifarResNet(10, depth=8, width=4, init="kaiming_fan_out",
                                                                   head_bias=True)):  # fmt: skip
        head = redraw(net, net.head)
        torch.manual_seed(1)
        reference = nn.Linear(head.in_features, head.out_features)  # its constructor draws the default init
        assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    # VGG (PHD-LAB): both Linear of the head N(0, 0.01), BN1d 1/0
    vgg = VGG(10, depth=11, width_divisor=16)
    head = redraw(vgg, vgg.head)
    w1, w2 = expected_draws(1, *[(head[i].weight, lambda t: t.normal_(0.0, 0.01)) for i in (2, 6)])
    assert torch.equal(head[2].weight, w1) and torch.equal(head[6].weight, w2)
    assert torch.all(head[0].weight == 1) and torch.all(head[6].bias == 0)


def test_wide_resnet_isometry_options_are_part_of_the_recipe() -> None:
    iso = WideResNet(10, depth=10, width=1, activation="srelu", dirac_init=True, skip_init=True)
    block = redraw(iso, iso.body[1])
    assert isinstance(block, WideBlock) and block.alpha.item() == 0.0
    for conv in (block.conv1, block.conv2, block.shortcut[0]):
        expected = torch.zeros_like(conv.weight)
        nn.init.dirac_(expected)
        assert torch.equal(conv.weight, expected)
    assert torch.all(block.act1.bias == -1)  # SReLU offset back to its init
    conv = redraw(iso, iso.body[0].conv2)  # one block conv alone (a subspace vertex is drawn layer by layer)
    assert torch.equal(conv.weight, nn.init.dirac_(torch.zeros_like(conv.weight)))
    slope = WideResNet(10, depth=10, width=4, init_slope=0.5, activation="prelu")
    block = redraw(slope, slope.body[2])
    gain_std = math.sqrt(2 / (1 + 0.5**2) / (256 * 9))  # leaky-ReLU gain, fan_out of a 256 -> 256 conv3x3
    assert block.conv1.weight.std().item() == pytest.approx(gain_std, rel=0.05)
    assert torch.all(block.act1.weight == 0.5)  # PReLU slope back to 0.5
    stem = redraw(slope, slope.stem)  # not a block conv: ReLU gain, no slope
    assert stem[0].weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.1)  # 16 stem channels


def test_pimlp_init_weights() -> None:
    # infinite: a layer goes back to M = r rows; re-drawing the whole net = building it from the global generator
    net = PiMLP(3, (1, 4, 4), r=5, depth=2, readout_zero_init=False, seed=0)
    opt = PiSGD([p for p in net.parameters() if p.requires_grad] + [l.Amult for l in net.layers()[1:]], lr=0.1)
    net(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert net.head.num_rows == 9
    assert redraw(net, net.head).num_rows == 5
    torch.manual_seed(3)
    built = PiMLP(3, (1, 4, 4), r=5, depth=2, readout_zero_init=False)
    torch.manual_seed(3)
    net.init_weights(net)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), built.state_dict().values()))
    # finite: a re-drawn input layer is the twin of a fresh A1 with unit columns: pinv(Omega) W sqrt(n) = A1^T
    fin = PiMLP(3, (1, 4, 4), r=5, depth=2, width=400, seed=0)
    stem = redraw(fin, fin.stem)
    a1_t = torch.linalg.pinv(fin.stem[1].omega) @ stem[1].linear.weight * math.sqrt(400)  # the net's Omega
    assert torch.allclose(a1_t.norm(dim=1), torch.ones(5), atol=1e-4) and torch.all(stem[1].bias == 0)
    linear = redraw(fin, fin.body[1].linear)  # a bare copy (a subspace vertex): in span(Omega_2), re-drawn
    omega = fin.body[1].omega
    assert torch.allclose(omega @ torch.linalg.pinv(omega) @ linear.weight, linear.weight, atol=1e-6)
    assert not torch.allclose(linear.weight, fin.body[1].linear.weight)
    head = redraw(fin, fin.head)  # readout A = 0 -> readout weights 0
    assert torch.all(head[1].linear.weight == 0) and torch.all(head[1].bias == 0)
    mu = PiMLP(3, (1, 4, 4), r=5, depth=2, width=2000, gaussian_init=True, gproj=False, seed=0)
    hidden = redraw(mu, mu.body)
    assert hidden[1].linear.weight.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.02)

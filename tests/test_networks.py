"""Backbones: seams, parameter counts against published ones, paper options, init recipes, config contract.

Big nets are built only to count parameters or are forwarded on one or two 32 px images;
everything else uses the smallest depth/width that exercises the option.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import manynets.networks
from manynets.networks import (
    MLP,
    VGG,
    Backbone,
    CifarResNet,
    PiMLP,
    PreActResNet,
    ResNet,
    SReLU,
    WideResNet,
    isometry_convs,
)
from manynets.networks.resnet import BasicBlock, PadShortcut
from manynets.networks.wide_resnet import TRUNC_NORMAL_2SIGMA_STD, WideBlock

BACKBONES = [obj for name in manynets.networks.__all__ if isinstance(obj := getattr(manynets.networks, name), type)
             and issubclass(obj, Backbone) and obj is not Backbone]  # fmt: skip


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def copy_state_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and buffers by registration order (the two nets have the same layout)."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert len(src_sd) == len(dst_sd)
    new = {}
    for (k_dst, v_dst), v_src in zip(dst_sd.items(), src_sd.values()):
        assert v_dst.shape == v_src.shape, k_dst
        new[k_dst] = v_src.clone()
    dst.load_state_dict(new)


# One small configuration per family and main option: (factory, input shape).
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "wrn_standard": (lambda: WideResNet(10, depth=10, width=1, dropout=0.1), (3, 32, 32)),
    "wrn_mimonet": (lambda: WideResNet(10, depth=10, width=1, initial_width=4, activation="prelu",
                                       stem_norm_act=True, shortcut_norm=True, final_norm_act=False), (3, 32, 32)),
    "wrn_isonet": (lambda: WideResNet(10, depth=10, width=1, activation="srelu", dirac_init=True,
                                      skip_init=True, stem_norm_act=True, shortcut_norm=True,
                                      final_norm_act=False), (3, 32, 32)),
    "wrn_mixmo": (lambda: WideResNet(10, depth=16, width=1, stride_on="conv2", strided_conv_padding="tf",
                                     init="mixmo"), (3, 32, 32)),
    "wrn_no_norm": (lambda: WideResNet(10, depth=10, width=1, norm=False, stem_norm_act=True), (3, 32, 32)),
    "preact18_tiny": (lambda: PreActResNet(200, (3, 64, 64), width=1, stem_stride=2, final_norm_act=False),
                      (3, 64, 64)),
    "preact18": (lambda: PreActResNet(10), (3, 32, 32)),
    "resnet18_imagenet_stem": (lambda: ResNet(10, width_divisor=8), (3, 32, 32)),
    "resnet18_cifar_stem_noskip": (lambda: ResNet(10, stem="cifar", width_divisor=8, skip=False), (3, 32, 32)),
    "resnet_late": (lambda: ResNet(10, width_divisor=8, blocks=(5, 1, 1, 1)), (3, 32, 32)),
    "resnet18_tiny_subspaces": (lambda: ResNet(200, (3, 64, 64), stem="cifar", width_divisor=8, head_bias=False,
                                               init="kaiming_fan_in"), (3, 64, 64)),
    "cifar_resnet20": (lambda: CifarResNet(10), (3, 32, 32)),
    "cifar_resnet20_pad": (lambda: CifarResNet(10, shortcut="pad", head_bias=True), (3, 32, 32)),
    "vgg11_phdlab": (lambda: VGG(10, depth=11, width_divisor=8), (3, 32, 32)),
    "vgg13_linear": (lambda: VGG(10, depth=13, width_divisor=8, head="linear"), (3, 32, 32)),
    "mlp": (lambda: MLP(10, (1, 8, 8), depth=3, width=32), (1, 8, 8)),
    "mlp_depth1": (lambda: MLP(10, (3, 32, 32), depth=1, width=16), (3, 32, 32)),
    "pimlp_infinite": (lambda: PiMLP(10, (1, 8, 8), r=6, depth=3, readout_zero_init=False), (1, 8, 8)),
    "pimlp_finite": (lambda: PiMLP(10, (1, 8, 8), r=6, depth=3, width=32), (1, 8, 8)),
}


def out_features(head: nn.Module) -> int:
    last = [m for m in head.modules() if hasattr(m, "out_features") or hasattr(m, "r_out")][-1]
    return getattr(last, "out_features", getattr(last, "r_out", None))


@pytest.mark.parametrize("name", sorted(CASES))
def test_seams_and_shapes(name: str) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        h = model.stem(x)
        feats = model.pool(model.body(h))
        logits = model(x)
        assert torch.allclose(model.head(feats), logits)
        assert torch.allclose(model.features(x), feats)
    assert h.shape[1] == model.stem_channels
    assert feats.shape == (2, model.feature_dim)
    assert logits.shape == (2, out_features(model.head))
    assert torch.isfinite(logits).all()


def test_every_backbone_is_a_backbone() -> None:
    assert {c.__name__ for c in BACKBONES} == {"WideResNet", "PreActResNet", "ResNet", "CifarResNet", "VGG", "MLP",
                                               "PiMLP"}  # fmt: skip
    for cls in BACKBONES:  # features/forward are written once, in Backbone
        assert all(name not in vars(klass) for klass in cls.__mro__[:-3] for name in ("features", "forward")), cls


@pytest.mark.parametrize("cls", BACKBONES, ids=lambda c: c.__name__)
def test_constructor_contract(cls: type) -> None:
    """``backbone(num_classes, image_shape)``; every other parameter keyword, typed, defaulted."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["num_classes", "image_shape"]
    assert params[1].default == (3, 32, 32)
    for p in params[2:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is not inspect.Parameter.empty, p.name
        assert p.annotation is not inspect.Parameter.empty, p.name
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params)


def test_jsonargparse_builds_backbones_from_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--backbone", type=Callable[[int, tuple[int, int, int]], nn.Module])
    configs = [
        ("WideResNet", {"depth": 10, "width": 1, "activation": "prelu", "activation_init": 0.3,
                        "stride_on": "conv2", "strided_conv_padding": "tf", "init": "mixmo"}),
        ("PreActResNet", {"depth": 34, "stem_stride": 2, "final_norm_act": False}),
        ("ResNet", {"blocks": [1, 1, 1, 5], "width_divisor": 8, "stem": "cifar", "skip": False}),
        ("CifarResNet", {"depth": 32, "shortcut": "pad"}),
        ("VGG", {"depth": 19, "width_divisor": 16, "head": "linear"}),
        ("MLP", {"depth": 1, "width": 8}),
        ("PiMLP", {"r": 4, "depth": 2, "bias_alpha": 0.5}),
        ("PiMLP", {"r": 4, "depth": 1, "width": 8, "gaussian_init": True, "gproj": False}),
    ]
    for name, init_args in configs:
        cfg = parser.parse_object({"backbone": {"class_path": f"manynets.networks.{name}", "init_args": init_args}})
        build = getattr(parser, "instantiate", None) or parser.instantiate_classes
        model = build(cfg).backbone(7, (3, 32, 32))
        assert type(model).__name__ == name
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


# ---------------------------------------------------------------- parameter counts


def test_wrn_28_10_parameter_count() -> None:
    # 36,479,194 for 10 classes in the common PyTorch WRN implementation (36.5M in the paper).
    assert n_params(WideResNet(10)) == pytest.approx(36_479_194, rel=0.005)


def test_wrn_depth_to_blocks() -> None:
    for depth, n in [(10, 1), (16, 2), (28, 4)]:
        model = WideResNet(10, depth=depth, width=1)
        assert sum(isinstance(m, WideBlock) for m in model.body) == 3 * n
    with pytest.raises(ValueError, match="depth = 27"):
        WideResNet(10, depth=27)


def test_resnet18_equals_torchvision() -> None:
    ours, ref = ResNet(1000, (3, 224, 224)), torchvision.models.resnet18()
    assert n_params(ours) == n_params(ref) == 11_689_512
    assert n_params(ResNet(1000, (3, 224, 224), depth=34)) == 21_797_672  # torchvision resnet34
    # Same modules in the same order: torchvision's weights give torchvision's outputs.
    copy_state_in_order(ref, ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-5)


def test_cifar_resnet20_parameter_count() -> None:
    def conv(ci: int, co: int, k: int) -> int:
        return ci * co * k * k

    bn = lambda c: 2 * c  # noqa: E731
    expected = conv(3, 16, 3) + bn(16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(3):
            expected += conv(c_in, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if c_in != c:
                expected += conv(c_in, c, 1) + bn(c)
            c_in = c
    expected += 64 * 10  # bias-free classifier
    assert expected == 272_464
    assert n_params(CifarResNet(10)) == expected
    # He et al.'s option A (parameter-free shortcut) with a biased Linear: "0.27M".
    assert n_params(CifarResNet(10, shortcut="pad", head_bias=True)) == expected - (512 + 64 + 2048 + 128) + 10
    assert n_params(CifarResNet(10, depth=56, shortcut="pad", head_bias=True)) == pytest.approx(0.85e6, rel=0.01)


def test_vgg16_bn_conv_part_equals_torchvision() -> None:
    ref = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    ours = VGG(10, depth=16)
    conv_part = nn.Sequential(ours.stem, ours.body)
    assert n_params(conv_part) == n_params(ref) == 14_723_136
    copy_state_in_order(ref, conv_part)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(conv_part.eval()(x), ref.eval()(x), atol=1e-5)
    # PHD-LAB head: BN1d(512) + Linear(512, 256) + BN1d(256) + Linear(256, 10).
    assert n_params(ours.head) == 2 * 512 + 512 * 256 + 256 + 2 * 256 + 256 * 10 + 10


def test_mlp_parameter_count_and_layout() -> None:
    model = MLP(10, (3, 32, 32), depth=3, width=64)
    assert n_params(model) == (3072 * 64 + 64) + 2 * (64 * 64 + 64) + (64 * 10 + 10)
    assert isinstance(model.stem[0], nn.Flatten) and isinstance(model.stem[1], nn.Linear)
    assert isinstance(model.pool, nn.Identity)
    assert len(MLP(10, depth=1, width=8).body) == 0


# ---------------------------------------------------------------- WideResNet options


def test_prelu_and_srelu_inits() -> None:
    prelu = WideResNet(10, depth=10, width=1, activation="prelu")
    weights = [m.weight for m in prelu.modules() if isinstance(m, nn.PReLU)]
    assert len(weights) == 2 * 3 + 1 and all(torch.all(w == 0.5) for w in weights)
    assert all(w.numel() > 1 for w in weights)  # per channel
    srelu = WideResNet(10, depth=10, width=1, activation="srelu", final_norm_act=False)
    offsets = [m.bias for m in srelu.modules() if isinstance(m, SReLU)]
    assert len(offsets) == 2 * 3 and all(torch.all(b == -1) for b in offsets)
    custom = WideResNet(10, depth=10, width=1, activation="prelu", activation_init=0.1)
    assert all(torch.all(m.weight == 0.1) for m in custom.modules() if isinstance(m, nn.PReLU))
    # Stem activation stays ReLU (MIMOConv).
    assert isinstance(WideResNet(10, depth=10, width=1, activation="prelu", stem_norm_act=True).stem[-1], nn.ReLU)


def test_srelu_is_max_of_input_and_offset() -> None:
    act = SReLU(3, init=-1.0)
    with torch.no_grad():
        act.bias.copy_(torch.tensor([-1.0, 0.0, 0.5]).view(1, 3, 1, 1))
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(act(x), torch.maximum(x, act.bias))


def test_skip_init_blocks_are_their_shortcut_at_init() -> None:
    model = WideResNet(10, depth=10, width=1, skip_init=True, shortcut_norm=True, stem_norm_act=True).eval()
    x = model.stem(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        for block in model.body:
            if isinstance(block, WideBlock):
                assert block.alpha is not None and block.alpha.item() == 0.0
                y = block(x)
                assert torch.equal(y, block.shortcut(x))
                x = y
    assert all(b.alpha is None for b in WideResNet(10, depth=10, width=1).body if isinstance(b, WideBlock))


def test_final_norm_act_and_mimonet_layout() -> None:
    standard = WideResNet(10, depth=10, width=1)
    assert isinstance(standard.body[-2], nn.BatchNorm2d) and isinstance(standard.body[-1], nn.ReLU)
    assert isinstance(standard.stem, nn.Sequential) and len(standard.stem) == 1  # bare conv stem
    mimo = WideResNet(10, depth=10, width=1, initial_width=4, activation="prelu", stem_norm_act=True,
                      shortcut_norm=True, final_norm_act=False)
    assert isinstance(mimo.body[-1], WideBlock)
    assert [type(m) for m in mimo.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert mimo.stem_channels == 64 and mimo.feature_dim == 64
    first = mimo.body[0]
    assert [type(m) for m in first.shortcut] == [nn.Conv2d, nn.BatchNorm2d]
    assert isinstance(standard.body[0].shortcut, nn.Identity)  # 16 -> 16, stride 1
    assert [type(m) for m in standard.body[1].shortcut] == [nn.Conv2d]
    # The shortcut reads the raw block input: conv1x1+BN of x itself.
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ref = first.shortcut[1](F.conv2d(x, first.shortcut[0].weight))
        assert torch.allclose(first.shortcut(x), ref)
    preact = PreActResNet(10, final_norm_act=False)
    assert not isinstance(preact.body[-1], (nn.BatchNorm2d, nn.ReLU))


def test_dropout_sits_between_the_block_convs() -> None:
    block = WideResNet(10, depth=10, width=1, dropout=0.3).body[0]
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.3
    assert isinstance(WideResNet(10, depth=10, width=1).body[0].dropout, nn.Identity)


def test_no_norm_removes_every_batchnorm() -> None:
    model = WideResNet(10, depth=10, width=1, norm=False, stem_norm_act=True, shortcut_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_isometry_convs_and_dirac_init() -> None:
    model = WideResNet(10, depth=16, width=2, initial_width=4, dirac_init=True, stem_norm_act=True,
                       shortcut_norm=True, final_norm_act=False)
    convs = isometry_convs(model)
    stem_conv = model.stem[0]
    assert all(c is not stem_conv for c in convs)
    assert len(convs) == 2 * 6 + 3  # two convs per block + three 1x1 shortcuts (64->32, 32->64, 64->128)
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    for conv in convs:
        expected = torch.zeros_like(conv.weight)
        nn.init.dirac_(expected)
        assert torch.equal(conv.weight, expected)
    assert stem_conv.weight.std() > 0.05  # Kaiming, not dirac


def test_kaiming_fan_out_init_std() -> None:
    model = WideResNet(10, depth=16, width=4)
    conv = model.body[2].conv2  # 128 -> 128 3x3, fan_out 1152
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


def test_mixmo_init_statistics() -> None:
    torch.manual_seed(0)
    model = WideResNet(100, depth=16, width=2, stride_on="conv2", strided_conv_padding="tf", init="mixmo")
    conv = model.body[4].conv1  # 64 -> 128 3x3, fan_in 576
    he = math.sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(he, rel=0.05)
    assert conv.weight.abs().max().item() <= 2 * he / TRUNC_NORMAL_2SIGMA_STD + 1e-6
    head = model.head.weight  # Linear(128, 100) gets the same truncated He init
    assert head.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert head.abs().max().item() <= 2 * math.sqrt(2 / 128) / TRUNC_NORMAL_2SIGMA_STD + 1e-6
    assert torch.all(model.head.bias == 0)
    preact = PreActResNet(200, width=1, init="mixmo")
    assert preact.head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(preact.head.bias == 0)
    c = preact.body[2].conv2  # 128 -> 128, fan_in 1152
    assert c.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)


@pytest.mark.parametrize("size", [32, 64])
def test_tf_padding_keeps_output_size(size: int) -> None:
    x = torch.randn(1, 3, size, size)
    tf = WideResNet(10, depth=10, width=1, stride_on="conv2", strided_conv_padding="tf").eval()
    same = WideResNet(10, depth=10, width=1).eval()
    with torch.no_grad():
        a, b = tf.body(tf.stem(x)), same.body(same.stem(x))
    assert a.shape == b.shape == (1, 64, size // 4, size // 4)
    strided = tf.body[1]
    assert isinstance(strided.conv2[0], nn.ZeroPad2d) and strided.conv2[1].padding == (0, 0)
    assert strided.conv2[1].stride == (2, 2) and strided.conv1.stride == (1, 1)


# ---------------------------------------------------------------- ResNet / VGG options


def test_resnet_width_divisor_and_block_overrides() -> None:
    xs = ResNet(10, width_divisor=4)
    assert xs.stem_channels == 16 and xs.feature_dim == 128
    early = ResNet(10, blocks=(1, 1, 1, 5))
    per_stage = [b.conv2.out_channels for b in early.body]
    assert per_stage == [64, 128, 256] + [512] * 5
    assert [type(m) for m in early.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert early.stem[0].kernel_size == (7, 7) and early.stem[0].stride == (2, 2)
    cifar = ResNet(10, stem="cifar")
    assert cifar.stem[0].kernel_size == (3, 3) and cifar.stem[0].stride == (1, 1) and len(cifar.stem) == 3
    with pytest.raises(ValueError, match="width_divisor = 3"):
        ResNet(10, width_divisor=3)


def test_noskip_resnet_has_no_residual_additions() -> None:
    torch.manual_seed(0)
    noskip = ResNet(10, stem="cifar", width_divisor=8, skip=False).eval()
    assert all(b.shortcut is None for b in noskip.body)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in noskip.modules())
    # Each block is the plain conv-BN-ReLU-conv-BN-ReLU chain.
    block = noskip.body[2]
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        plain = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))
        assert torch.allclose(block(x), plain)
    # Same weights with skips give different outputs.
    skip = ResNet(10, stem="cifar", width_divisor=8, skip=True).eval()
    skip.load_state_dict(noskip.state_dict(), strict=False)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(skip(img), noskip(img))
    shortcut_params = n_params(skip) - n_params(noskip)
    assert shortcut_params == sum(n_params(b.shortcut) for b in skip.body if isinstance(b, BasicBlock))
    assert shortcut_params > 0


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)


def test_subspaces_cifar_resnet20_layout() -> None:
    model = CifarResNet(10)
    assert model.head.bias is None and model.feature_dim == 64 and model.stem_channels == 16
    # conv shortcut only where the shape changes, stride 2.
    shortcuts = [b.shortcut for b in model.body]
    assert sum(isinstance(s, nn.Sequential) for s in shortcuts) == 2
    assert model.head.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.2)  # fan_in init
    with pytest.raises(ValueError, match="depth = 21"):
        CifarResNet(10, depth=21)


def test_vgg_heads_and_widths() -> None:
    phdlab = VGG(10, depth=16, width_divisor=4)
    assert phdlab.stem_channels == 16 and phdlab.feature_dim == 128
    types = [type(m) for m in phdlab.head]
    assert types == [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert phdlab.head[2].out_features == 64 and phdlab.head[1].p == 0.25
    linear = VGG(10, depth=19, head="linear")
    assert isinstance(linear.head, nn.Linear) and linear.head.in_features == 512
    assert linear.head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    convs = [m for m in linear.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in linear.body) == 5

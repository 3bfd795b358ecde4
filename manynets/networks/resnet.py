"""Post-activation BasicBlock ResNets: torchvision-style ResNet-18/34 and CIFAR ResNet-20/32/44/56.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385).

:class:`ResNet` follows torchvision's ``resnet18``/``resnet34`` (same modules, same
11,689,512 parameters for 1000 classes) with the options of the PHD-LAB saturation study
(Richter et al., official ``delve-team/phd-lab`` ``phd_lab/models/resnet.py``, spec
pinet_saturation §2.9): the ImageNet stem used unchanged at 32 px, widths divided by 2/4/8
(``_S``/``_XS``/``_XXS``), early/late block distributions and no-skip variants; and of the
subspaces Tiny ImageNet ResNet-18 (Wortsman et al., ICML 2021, official
``apple/learning-subspaces`` ``models/tinyimagenetresnet.py``: 3x3 stride-1 stem, bias-free
classifier, Kaiming fan_in init). YAML examples::

    init_args: {depth: 18}                                        # PHD-LAB resnet18
    init_args: {depth: 18, width_divisor: 4}                      # resnet18_XS
    init_args: {depth: 18, blocks: [1, 1, 1, 5]}                  # resnet18_early
    init_args: {depth: 18, stem: cifar, skip: false}              # PC_ResNet18
    init_args: {depth: 18, stem: cifar, head_bias: false, init: kaiming_fan_in}  # subspaces Tiny

:class:`CifarResNet` is the paper's CIFAR ResNet (16/32/64 channels, 3 stages of (depth-2)/6
blocks). Its defaults are the subspaces ``cifar_resnet_20`` recipe (``models/cifar_resnet.py``):
1x1-conv+BN shortcut, bias-free classifier, Kaiming fan_in init; He et al.'s option A is
``shortcut: pad, head_bias: true``.

The classifier is always a Linear on the pooled features: a bias-free Linear equals the
official bias-free 1x1 conv applied after global pooling. ReLUs are not in-place so that
forward hooks (probes) see unmodified tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from manynets.errors import check_arg

from .base import ARG, Backbone, init_modules, kaiming_normal, make_linear

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``shortcut`` is ``None`` for a no-skip block (no residual addition at all), the identity
    when the shape is unchanged, else the given module (1x1 conv + BN, or zero padding).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = shortcut
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(c_in: int, c_out: int, stride: int, kind: Literal["conv", "pad"], skip: bool) -> nn.Module | None:
    if not skip:
        return None
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(c_in, c_out, stride)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


Init = Literal["kaiming_fan_out", "kaiming_fan_in"]


class _KaimingResNet(Backbone):
    """Shared init of :class:`ResNet` and :class:`CifarResNet`: ``kaiming_fan_out`` (torchvision: convs
    N(0, 2/fan_out), Linear PyTorch default) or ``kaiming_fan_in`` (subspaces: convs and classifier
    N(0, 2/fan_in), bias 0); BN 1/0 in both."""

    init: Init

    def _finish(self, c_in: int, num_classes: int, head_bias: bool, init: Init) -> None:
        self.feature_dim = c_in
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = make_linear(c_in, num_classes, head_bias, default_init=init == "kaiming_fan_out")
        self.init = init
        self.init_weights(self)

    def init_weights(self, module: nn.Module) -> nn.Module:
        """The recipe of ``init`` (class doc) on every Conv2d, Linear and BN of ``module``."""
        if self.init == "kaiming_fan_in":
            return init_modules(module, conv=kaiming_normal("fan_in"), linear=kaiming_normal("fan_in"))
        return init_modules(module, conv=kaiming_normal("fan_out"))


class ResNet(_KaimingResNet):
    """torchvision-style BasicBlock ResNet-18/34 split at the seams ``stem -> body -> pool -> head``.

    Args:
        num_classes: logits of the Linear head.
        image_shape: (C, H, W) of the input; only C is used.
        depth: 18 (blocks 2,2,2,2) or 34 (3,4,6,3); ignored when ``blocks`` is given.
        stem: ``imagenet`` (conv7x7/2-BN-ReLU-maxpool3x3/2, also at 32 px as PHD-LAB does) or
            ``cifar`` (conv3x3/1-BN-ReLU, no maxpool).
        width_divisor: stage widths 64/d, 128/d, 256/d, 512/d (PHD-LAB ``_S``=2, ``_XS``=4, ``_XXS``=8).
        blocks: blocks per stage, overriding ``depth`` (early [1,1,1,5], late [5,1,1,1]); stage i
            has min(64·2^i, 512)/d channels and stride 2 except the first.
        skip: False removes every residual connection (and the shortcut convs), as PHD-LAB's
            ``noskip`` variants and ``PC_ResNet18``.
        head_bias: bias of the Linear classifier.
        init: ``kaiming_fan_out`` (torchvision, PHD-LAB) or ``kaiming_fan_in`` (subspaces).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: Literal[18, 34] = 18,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        width_divisor: int = 1,
        blocks: tuple[int, ...] | None = None,
        skip: bool = True,
        head_bias: bool = True,
        init: Literal["kaiming_fan_out", "kaiming_fan_in"] = "kaiming_fan_out",
    ) -> None:
        super().__init__()
        check_arg(blocks is not None or depth in _BLOCKS, ARG + "depth", depth, f"one of {sorted(_BLOCKS)}",
                  "Or give blocks per stage, e.g. [1, 1, 1, 5].")
        blocks = _BLOCKS[depth] if blocks is None else blocks
        check_arg(len(blocks) > 0 and min(blocks) >= 1, ARG + "blocks", blocks, "a non-empty list of counts >= 1")
        check_arg(width_divisor >= 1 and 64 % width_divisor == 0, ARG + "width_divisor", width_divisor,
                  "a divisor of 64 (1, 2, 4, 8)")
        check_arg(stem in ("imagenet", "cifar"), ARG + "stem", stem, "'imagenet' or 'cifar'")
        c0 = 64 // width_divisor
        self.stem_channels = c0
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(image_shape[0], c0, 7, 2, 3, bias=False), nn.BatchNorm2d(c0), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:  # cifar
            self.stem = nn.Sequential(nn.Conv2d(image_shape[0], c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = c0
        for stage, n in enumerate(blocks):
            c_out = min(64 * 2**stage, 512) // width_divisor
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride, _shortcut(c_in, c_out, stride, "conv", skip)))
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self._finish(c_in, num_classes, head_bias, init)


class CifarResNet(_KaimingResNet):
    """CIFAR ResNet-20/32/44/56 (He et al. 2016 §4.2) split at the seams ``stem -> body -> pool -> head``.

    Stem conv3x3-BN-ReLU with ``width`` channels, then 3 stages of (depth-2)/6 BasicBlocks with
    width/2·width/4·width channels and strides 1/2/2, global average pool, Linear.
    ResNet-20 with the defaults has 272,464 parameters for 10 classes (272,474 with ``head_bias``).

    Args:
        num_classes: logits of the Linear head.
        image_shape: (C, H, W) of the input; only C is used.
        depth: 6n+2 (20, 32, 44, 56, 110).
        width: channels of the stem and first stage (16 in the paper).
        shortcut: ``conv`` (1x1 conv + BN, subspaces) or ``pad`` (option A: subsample and zero-pad).
        head_bias: bias of the Linear classifier (subspaces: a bias-free 1x1 conv, i.e. False).
        init: ``kaiming_fan_in`` (subspaces: convs and classifier N(0, 2/fan_in)) or
            ``kaiming_fan_out`` (convs N(0, 2/fan_out), Linear PyTorch default).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: int = 20,
        width: int = 16,
        shortcut: Literal["conv", "pad"] = "conv",
        head_bias: bool = False,
        init: Literal["kaiming_fan_out", "kaiming_fan_in"] = "kaiming_fan_in",
    ) -> None:
        super().__init__()
        check_arg(depth >= 8 and (depth - 2) % 6 == 0, ARG + "depth", depth, "6n+2 >= 8 (20, 32, 44, 56, 110)")
        check_arg(width >= 1, ARG + "width", width, ">= 1 channels of the first stage", "16 in He et al.")
        n = (depth - 2) // 6
        self.stem_channels = width
        self.stem = nn.Sequential(nn.Conv2d(image_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride, _shortcut(c_in, c_out, stride, shortcut, True)))
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self._finish(c_in, num_classes, head_bias, init)

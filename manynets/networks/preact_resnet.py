"""Pre-activation ResNet-18/34 with a width factor (MixMo's Tiny ImageNet backbone).

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv 1603.05027).
MixMo (Ramé et al., ICCV 2021, official ``alexrame/mixmo-pytorch``
``mixmo/networks/resnet.py``) uses PreActResNet-18-w on Tiny ImageNet: a conv3x3 stride-2
stem with 64 channels (not widened), stages of 64w/128w/256w/512w channels, no final BN-ReLU,
global average pooling (MixMo's ``avg_pool2d(·, 4)`` on the final 4x4 map) and a truncated-normal He init with Linear N(0, 0.01). As YAML::

    backbone:
      class_path: manynets.networks.PreActResNet
      init_args: {depth: 18, width: 2, stem_stride: 2, final_norm_act: false, init: mixmo}

Blocks are BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3; when the shape changes the shortcut is a
1x1 conv (no BN) on the pre-activated input, else the identity on the raw input (as in the
paper's Fig. 4 and the MixMo code).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from manynets.errors import check_arg

from .base import ARG, Backbone, he_trunc_normal_, init_modules, kaiming_normal, make_linear, normal

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + shortcut


class PreActResNet(Backbone):
    """PreActResNet-18/34-w split at the seams ``stem -> body -> pool -> head``.

    Args:
        num_classes: logits of the Linear head.
        image_shape: (C, H, W) of the input; only C is used.
        depth: 18 (blocks 2,2,2,2) or 34 (3,4,6,3).
        width: widening factor w of the stages (64w..512w); the 64-channel stem is not widened.
        stem_stride: stride of the stem conv3x3 (MixMo Tiny ImageNet: 2 for 64 px inputs).
        final_norm_act: BN-ReLU after the last block (He et al. 2016); MixMo has none.
        init: ``kaiming_fan_out`` (convs N(0, 2/fan_out), BN 1/0, Linear PyTorch default) or
            ``mixmo`` (convs He fan_in truncated to ±2σ with σ/0.8796, Linear N(0, 0.01), biases 0);
            :meth:`init_weights` applies it.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: Literal[18, 34] = 18,
        width: int = 1,
        stem_stride: int = 1,
        final_norm_act: bool = True,
        init: Literal["kaiming_fan_out", "mixmo"] = "kaiming_fan_out",
    ) -> None:
        super().__init__()
        check_arg(depth in _BLOCKS, ARG + "depth", depth, f"one of {sorted(_BLOCKS)}")
        check_arg(width >= 1, ARG + "width", width, ">= 1 (the widening factor)")
        check_arg(stem_stride >= 1, ARG + "stem_stride", stem_stride, ">= 1", "MixMo uses 2 for 64 px Tiny ImageNet.")
        self.stem_channels = 64
        self.stem = nn.Conv2d(image_shape[0], 64, 3, stem_stride, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = 64
        for stage, n in enumerate(_BLOCKS[depth]):
            c_out = 64 * width * 2**stage
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        if final_norm_act:
            blocks += [nn.BatchNorm2d(c_in), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.feature_dim = c_in
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = make_linear(c_in, num_classes, default_init=init != "mixmo")
        self.init = init
        self.init_weights(self)

    def init_weights(self, module: nn.Module) -> nn.Module:
        """The recipe of ``init`` (class doc) on every Conv2d, Linear and BN of ``module``."""
        if self.init == "mixmo":
            return init_modules(module, conv=he_trunc_normal_, linear=normal(0.01))
        return init_modules(module, conv=kaiming_normal("fan_out"))

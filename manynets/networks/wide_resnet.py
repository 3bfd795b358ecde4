"""Pre-activation Wide ResNet (WRN-depth-width) with the options of MIMOConv and MixMo.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv 1605.07146).
The same class builds the three recipes used in this project:

* **standard / MixMo WRN-28-10** (Ramé et al., ICCV 2021, official
  ``alexrame/mixmo-pytorch`` ``mixmo/networks/wrn.py``): bare conv3x3 stem, pre-activation
  blocks, 1x1 conv shortcut without BN, final BN-ReLU, global average pool. MixMo also
  puts the stride on the block's second conv with TensorFlow-style asymmetric padding and
  uses a truncated-normal He init; as YAML::

      backbone:
        class_path: manynets.networks.WideResNet
        init_args: {depth: 28, width: 10, stride_on: conv2, strided_conv_padding: tf, init: mixmo}

* **MIMONet-28-10** (Menet et al., NeurIPS 2023, official
  ``IBM/multiple-input-multiple-output-nets`` ``MIMOConv/src/models/superwideresnet.py``,
  spec §1.1/§1.3): stem conv-BN-ReLU with 16·4 = 64 channels, PReLU (0.5) in the blocks,
  conv1x1+BN shortcut, no final BN-ReLU::

      init_args: {depth: 28, width: 10, initial_width: 4, activation: prelu,
                  stem_norm_act: true, shortcut_norm: true, final_norm_act: false}

  WideISONet: ``activation: srelu`` (b = -1), ``dirac_init: true``, usually ``skip_init: true``;
  its isometry penalty covers :func:`isometry_convs` (block and shortcut convs, not the stem).

Shortcuts read the raw block input as in both official repos above (Zagoruyko's reference
code feeds the pre-activated input to the 1x1 conv instead; the parameter count is the same).
ReLUs are not in-place so that forward hooks (probes) see unmodified tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from manynets.errors import check_arg

from .base import (  # noqa: F401 (TRUNC_NORMAL_2SIGMA_STD re-exported)
    ARG,
    TRUNC_NORMAL_2SIGMA_STD,
    Backbone,
    he_trunc_normal_,
    init_modules,
    kaiming_normal,
    make_linear,
)

Activation = Literal["relu", "prelu", "srelu"]
Init = Literal["kaiming_fan_out", "mixmo"]


class SReLU(nn.Module):
    """Shifted ReLU y = max(x - b, 0) + b with a learned per-channel offset b (WideISONet).

    Qi et al., "Deep Isometric Learning for Visual Recognition" (ISONet), ICML 2020; MIMOConv
    initialises b to -1 (``superwideisonet.py``).

    Args:
        channels: number of channels (one offset each).
        init: initial value of every offset b.
    """

    def __init__(self, channels: int, init: float = -1.0) -> None:
        super().__init__()
        self.init = float(init)
        self.bias = nn.Parameter(torch.full((1, channels, 1, 1), self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.bias, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - self.bias) + self.bias


def make_activation(kind: Activation, channels: int, init: float | None) -> nn.Module:
    """ReLU, per-channel PReLU (default init 0.5, MIMONet) or SReLU (default init -1, WideISONet)."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "prelu":
        return nn.PReLU(channels, init=0.5 if init is None else init)
    if kind == "srelu":
        return SReLU(channels, -1.0 if init is None else init)
    raise ValueError(f"activation={kind!r}; expected 'relu', 'prelu' or 'srelu'")


def _conv3x3(c_in: int, c_out: int, stride: int, padding: Literal["same", "tf"]) -> nn.Module:
    if stride > 1 and padding == "tf":
        # TensorFlow "SAME" for stride 2 on even sizes pads only right/bottom.
        return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c_in, c_out, 3, stride, 0, bias=False))
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class WideBlock(nn.Module):
    """Pre-activation block: BN-act-conv3x3-(dropout)-BN-act-conv3x3, plus shortcut.

    ``out = alpha * F(x) + shortcut(x)`` with a trainable scalar ``alpha = 0`` at init when
    ``skip_init`` (De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity
    Function", NeurIPS 2020; MIMOConv ``-k``), else ``F(x) + shortcut(x)``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        dropout: float,
        activation: Activation,
        activation_init: float | None,
        norm: bool,
        shortcut_norm: bool,
        stride_on: Literal["conv1", "conv2"],
        strided_conv_padding: Literal["same", "tf"],
        skip_init: bool,
    ) -> None:
        super().__init__()
        s1, s2 = (stride, 1) if stride_on == "conv1" else (1, stride)
        self.bn1 = nn.BatchNorm2d(c_in) if norm else nn.Identity()
        self.act1 = make_activation(activation, c_in, activation_init)
        self.conv1 = _conv3x3(c_in, c_out, s1, strided_conv_padding)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.act2 = make_activation(activation, c_out, activation_init)
        self.conv2 = _conv3x3(c_out, c_out, s2, strided_conv_padding)
        if stride != 1 or c_in != c_out:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, stride, bias=False)]
            if norm and shortcut_norm:
                layers.append(nn.BatchNorm2d(c_out))
            self.shortcut: nn.Module = nn.Sequential(*layers)
        else:
            self.shortcut = nn.Identity()
        self.alpha = nn.Parameter(torch.zeros(())) if skip_init else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.in_residual_block = True  # init_weights finds the block convs even in a copy of one conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.act2(self.bn2(self.dropout(out))))
        if self.alpha is not None:
            out = self.alpha * out
        return out + self.shortcut(x)


class WideResNet(Backbone):
    """WRN-depth-width split at the seams ``stem -> body -> pool -> head``.

    Stages of (depth-4)/6 blocks with 16w/32w/64w channels and strides 1/2/2
    (depth 28 -> 4, 16 -> 2, 10 -> 1 blocks per stage). WRN-28-10 with the defaults has
    36,479,194 parameters for 10 classes.

    Args:
        num_classes: logits of the Linear head.
        image_shape: (C, H, W) of the input; only C is used.
        depth: 6n+4.
        width: widening factor w.
        initial_width: stem channels are 16·initial_width (MIMONet: 4).
        stem_stride: stride of the stem conv3x3.
        stem_norm_act: stem conv -> BN -> ReLU (MIMOConv) instead of a bare conv. The stem
            activation is always ReLU, as in MIMOConv.
        shortcut_norm: BN after the 1x1 shortcut conv (MIMOConv); MixMo has none.
        final_norm_act: BN-act after the last block (standard WRN, MixMo); MIMONet has none.
        activation: block (and final) activation: ``relu``, per-channel ``prelu`` or ``srelu``.
        activation_init: PReLU slope / SReLU offset at init; None -> 0.5 / -1 (MIMOConv).
        skip_init: ``out = alpha·F(x) + shortcut`` with trainable alpha = 0 at init.
        dirac_init: ``nn.init.dirac_`` on the block and shortcut convs (:func:`isometry_convs`).
        norm: BatchNorm everywhere; False replaces every BN by Identity.
        dropout: dropout probability between the two convs of a block.
        stride_on: which conv of a downsampling block is strided (MixMo: ``conv2``).
        strided_conv_padding: ``same`` (padding 1) or ``tf`` (ZeroPad2d((0,1,0,1)) then padding 0,
            MixMo); output sizes are equal for even inputs.
        init: ``kaiming_fan_out`` (convs N(0, 2/fan_out), BN 1/0, Linear PyTorch default;
            MIMOConv, Zagoruyko) or ``mixmo`` (convs and Linear: He fan_in truncated to ±2σ, σ/0.8796,
            biases 0).
        init_slope: with ``kaiming_fan_out``, use the leaky-ReLU gain with this negative slope on
            the block and shortcut convs (:func:`isometry_convs`): the init MIMOConv's ISO models
            intend (0.5 for MIMONet's PReLU, 0.45 for WideISONet) but never run, since that branch
            of the official code is dead (spec §1.10). None: ReLU gain.

    :meth:`init_weights` applies all of ``init``, ``init_slope``, ``dirac_init`` and ``skip_init``
    (module doc of :mod:`manynets.networks.base` for the order of draws).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: int = 28,
        width: int = 10,
        initial_width: int = 1,
        stem_stride: int = 1,
        stem_norm_act: bool = False,
        shortcut_norm: bool = False,
        final_norm_act: bool = True,
        activation: Activation = "relu",
        activation_init: float | None = None,
        skip_init: bool = False,
        dirac_init: bool = False,
        norm: bool = True,
        dropout: float = 0.0,
        stride_on: Literal["conv1", "conv2"] = "conv1",
        strided_conv_padding: Literal["same", "tf"] = "same",
        init: Init = "kaiming_fan_out",
        init_slope: float | None = None,
    ) -> None:
        super().__init__()
        check_arg(depth >= 10 and (depth - 4) % 6 == 0, ARG + "depth", depth, "6n+4 >= 10 (10, 16, 22, 28, 40)")
        check_arg(width >= 1, ARG + "width", width, ">= 1 (the widening factor)", "WRN-28-10 has width 10.")
        check_arg(initial_width >= 1, ARG + "initial_width", initial_width, ">= 1", "MIMONet uses 4.")
        check_arg(stem_stride >= 1, ARG + "stem_stride", stem_stride, ">= 1")
        check_arg(0.0 <= dropout < 1.0, ARG + "dropout", dropout, "a probability in [0, 1)")
        check_arg(activation in ("relu", "prelu", "srelu"), ARG + "activation", activation,
                  "'relu', 'prelu' or 'srelu'")
        n = (depth - 4) // 6
        c0 = 16 * initial_width
        widths = (16 * width, 32 * width, 64 * width)
        self.stem_channels = c0
        self.feature_dim = widths[-1]

        stem: list[nn.Module] = [nn.Conv2d(image_shape[0], c0, 3, stem_stride, 1, bias=False)]
        if stem_norm_act:
            stem += [nn.BatchNorm2d(c0) if norm else nn.Identity(), nn.ReLU()]
        self.stem = nn.Sequential(*stem)

        blocks: list[nn.Module] = []
        c_in = c0
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    WideBlock(
                        c_in, c_out, stride,
                        dropout=dropout, activation=activation, activation_init=activation_init,
                        norm=norm, shortcut_norm=shortcut_norm, stride_on=stride_on,
                        strided_conv_padding=strided_conv_padding, skip_init=skip_init,
                    )
                )
                c_in = c_out
        if final_norm_act:
            blocks += [nn.BatchNorm2d(c_in) if norm else nn.Identity(),
                       make_activation(activation, c_in, activation_init)]
        self.body = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = make_linear(self.feature_dim, num_classes, default_init=init != "mixmo")
        self.init, self.init_slope, self.dirac_init = init, init_slope, dirac_init
        self.init_weights(self)

    def init_weights(self, module: nn.Module) -> nn.Module:
        """The WRN recipe on ``module`` (any part or copy of a part), in place:

        1. ``init`` on every Conv2d and Linear (``kaiming_fan_out``: convs Kaiming fan_out, Linear
           PyTorch default; ``mixmo``: both truncated He fan_in, biases 0); BN 1/0; PReLU slopes and
           SReLU offsets back to ``activation_init``;
        2. on the convs of the residual blocks in ``module`` (the :func:`isometry_convs`, also a copy of
           one of them; a stem or head has none): ``init_slope`` re-draws them with the leaky-ReLU gain
           (``kaiming_fan_out`` only), then ``dirac_init`` sets them to the identity;
        3. ``skip_init``: every block's ``alpha`` back to 0.
        """
        mixmo = self.init == "mixmo"
        conv = he_trunc_normal_ if mixmo else kaiming_normal("fan_out")
        init_modules(module, conv=conv, linear=he_trunc_normal_ if mixmo else None)
        blocks = [m for m in module.modules() if isinstance(m, WideBlock)]
        convs = [c for c in module.modules() if isinstance(c, nn.Conv2d) and getattr(c, "in_residual_block", False)]
        with torch.no_grad():
            if self.init_slope is not None and not mixmo:
                for c in convs:
                    nn.init.kaiming_normal_(c.weight, a=self.init_slope, mode="fan_out", nonlinearity="leaky_relu")
            if self.dirac_init:
                for c in convs:
                    nn.init.dirac_(c.weight)
            for b in blocks:
                if b.alpha is not None:
                    b.alpha.zero_()
        return module


def isometry_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The convs an ISONet isometry penalty covers: every Conv2d of ``model.body``.

    For :class:`WideResNet` these are the block convs and the 1x1 shortcut convs; the stem
    (and anything a method adds outside the backbone: binding, unbinding) is excluded, as
    MIMOConv's ``noOrthoRegularization`` layers are (spec §1.3).
    """
    return [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]

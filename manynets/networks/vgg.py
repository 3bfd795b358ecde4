"""VGG-11/13/16/19 with BatchNorm (configurations A/B/D/E) for small images.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (arXiv 1409.1556); BN after every conv as in torchvision's ``vgg*_bn``. The
``phdlab`` head and the init are the PHD-LAB saturation study's (Richter et al., official
``delve-team/phd-lab`` ``phd_lab/models/vgg.py``, spec pinet_saturation §2.9): global average
pool -> BN1d -> Dropout(.25) -> Linear(F, F/2) -> ReLU -> BN1d -> Dropout(.25) -> Linear(F/2, classes),
all Linear weights N(0, 0.01). YAML example (PHD-LAB ``vgg16_XS``)::

    backbone:
      class_path: manynets.networks.VGG
      init_args: {depth: 16, width_divisor: 4, head: phdlab}

``width_divisor`` divides every conv width (PHD-LAB ``_S``/``_XS``/``_XXS``/``_XXXS`` = 2/4/8/16;
its ``vgg11_S`` table has a 126 where 128 is meant, here it is 128).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from manynets.errors import check_arg

from .base import ARG, Backbone, init_modules, kaiming_normal, normal

CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU()]


class VGG(Backbone):
    """VGG-BN split at the seams ``stem -> body -> pool -> head``.

    ``stem`` is the first conv-BN-ReLU (``stem_channels`` = 64/d), ``body`` the remaining convs
    and the five 2x2 max pools, ``pool`` global average pool + flatten (``feature_dim`` = 512/d),
    ``head`` a Linear (``linear``) or PHD-LAB's BN/Dropout MLP (``phdlab``).

    Args:
        num_classes: logits of the head.
        image_shape: (C, H, W) of the input; only C is used (H, W >= 32 for the five pools).
        depth: 11, 13, 16 or 19 (configurations A, B, D, E).
        width_divisor: divides every conv width (must divide 64).
        head: ``phdlab`` (PHD-LAB classifier) or ``linear`` (one Linear on the pooled features).
        dropout: dropout probability of the ``phdlab`` head.

    Init (PHD-LAB, torchvision; :meth:`init_weights`): convs Kaiming-normal fan_out, biases 0; BN 1/0;
    Linear N(0, 0.01), bias 0.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: Literal[11, 13, 16, 19] = 16,
        width_divisor: int = 1,
        head: Literal["phdlab", "linear"] = "phdlab",
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        check_arg(depth in CONFIGS, ARG + "depth", depth, f"one of {sorted(CONFIGS)}")
        check_arg(width_divisor >= 1 and 64 % width_divisor == 0, ARG + "width_divisor", width_divisor,
                  "a divisor of 64", "PHD-LAB's _S/_XS/_XXS/_XXXS are 2/4/8/16.")
        check_arg(head in ("phdlab", "linear"), ARG + "head", head, "'phdlab' or 'linear'")
        check_arg(0.0 <= dropout < 1.0, ARG + "dropout", dropout, "a probability in [0, 1)", "PHD-LAB uses 0.25.")
        cfg = [v if v == "M" else int(v) // width_divisor for v in CONFIGS[depth]]
        c0 = int(cfg[0])
        self.stem_channels = c0
        self.stem = nn.Sequential(*_conv_bn_relu(image_shape[0], c0))
        layers: list[nn.Module] = []
        c_in = c0
        for v in cfg[1:]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += _conv_bn_relu(c_in, v)
                c_in = v
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if head == "phdlab":
            hidden = c_in // 2
            self.head: nn.Module = nn.Sequential(
                nn.BatchNorm1d(c_in), nn.Dropout(dropout), nn.Linear(c_in, hidden), nn.ReLU(),
                nn.BatchNorm1d(hidden), nn.Dropout(dropout), nn.Linear(hidden, num_classes),
            )
        else:  # linear
            self.head = nn.Linear(c_in, num_classes)
        self.init_weights(self)

    def init_weights(self, module: nn.Module) -> nn.Module:
        """Convs Kaiming-normal fan_out, Linear N(0, 0.01), biases 0, BN 1/0 (class doc)."""
        return init_modules(module, conv=kaiming_normal("fan_out"), linear=normal(0.01))

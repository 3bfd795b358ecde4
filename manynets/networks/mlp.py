"""Fully connected ReLU network on flattened images (the finite-width baseline of the π-net study).

Yang, Santacroce & Hu, "Efficient Computation of Deep Nonlinear Infinite-Width Neural Networks
that Learn Features" (π-limit), ICLR 2022; official ``santacml/pilim``
``experiments/cifar10/cifar10mlp.py`` trains such MLPs on flattened CIFAR-10 (3072 inputs).
``depth`` counts hidden layers (the paper's and ``pilimit_orig``'s L; ``pilimit_lib``'s
``--depth`` is one less, spec pinet_saturation §1.2). YAML example::

    backbone:
      class_path: manynets.networks.MLP
      init_args: {depth: 2, width: 2048}

Weights get PyTorch's default Linear init (:meth:`MLP.init_weights`); the π-net's own parametrisation
is :class:`~manynets.networks.PiMLP`.
"""

from __future__ import annotations

import math

from torch import nn

from manynets.errors import check_arg

from .base import ARG, Backbone, make_linear


class MLP(Backbone):
    """flatten -> ``depth`` x (Linear(width) + ReLU) -> Linear head, split at the usual seams.

    ``stem`` = Flatten + first Linear + ReLU, ``body`` = the other hidden layers (empty for
    depth 1), ``pool`` = Identity, ``head`` = Linear(width, num_classes);
    ``feature_dim`` = ``stem_channels`` = ``width``.

    Args:
        num_classes: logits of the head.
        image_shape: (C, H, W); the input dimension is C·H·W.
        depth: number of hidden layers (>= 1).
        width: units per hidden layer.
        bias: biases in every Linear.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        depth: int = 2,
        width: int = 1024,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_arg(depth >= 1, ARG + "depth", depth, ">= 1 hidden layers")
        check_arg(width >= 1, ARG + "width", width, ">= 1 units per hidden layer")
        self.stem_channels = self.feature_dim = width
        self.stem = nn.Sequential(nn.Flatten(), make_linear(math.prod(image_shape), width, bias, default_init=True),
                                  nn.ReLU())  # fmt: skip
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [make_linear(width, width, bias, default_init=True), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.pool = nn.Identity()
        self.head = make_linear(width, num_classes, bias, default_init=True)
        self.init_weights(self)

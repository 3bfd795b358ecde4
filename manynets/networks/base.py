"""The seam every method works at: ``image -> stem -> body -> pool -> head -> logits`` (docs/architecture.md).

A :class:`Backbone` is built as ``Backbone(num_classes, image_shape, **options)`` and has

- ``stem``, ``body``, ``pool``, ``head``: modules with ``features(x) = pool(body(stem(x)))`` and
  ``forward(x) = head(features(x))`` (written once, here);
- ``stem_channels``: channels of the stem output, (B, C, H, W) maps or (B, C) vectors;
- ``feature_dim``: size of the pooled features that ``head`` takes, (B, feature_dim);
- :meth:`init_weights`: the backbone's own initialisation recipe (the paper's), applied in place to
  the backbone or to any module of the same kinds (a copied stem or head, an extra subspace vertex),
  so methods re-draw parameters without knowing which backbone it is.

Superposition binds after ``stem`` and unbinds before ``head``; MixMo gives each member its own
``stem`` and ``head``; subspaces turn every Conv/Linear/BN into a subspace layer; probes and saturation
hook into any named layer.

The recipes are applied by :func:`init_modules` in two passes over ``module.modules()``: first every
Conv2d/Linear whose recipe is PyTorch's default (``reset_parameters``), then the drawn recipes, in
module order. A backbone builds its default-init layers with :func:`make_linear` (``torch.nn.utils.skip_init``:
no draw in the constructor), so ``init_weights(self)`` at the end of ``__init__`` draws exactly what
the constructors used to draw, in the same order.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

ARG = "model.init_args.backbone.init_args."  # how a config names a backbone option
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
WeightInit = Callable[[torch.Tensor], torch.Tensor]

# Standard deviation of a unit normal truncated to [-2, 2]: dividing the target std by it
# makes the truncated draw have that std (MixMo ``mixmo/utils/torchutils.py``).
TRUNC_NORMAL_2SIGMA_STD = 0.87962566103423978


def he_trunc_normal_(weight: torch.Tensor) -> torch.Tensor:
    """MixMo init: normal truncated to ±2σ with σ = sqrt(2 / fan_in) / 0.8796 (TF-style He)."""
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / TRUNC_NORMAL_2SIGMA_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def kaiming_normal(mode: str) -> WeightInit:
    """He et al. 2015 normal init with the ReLU gain and ``mode`` ``fan_in`` or ``fan_out``."""
    return lambda w: nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu")


def normal(std: float) -> WeightInit:
    """N(0, std^2) (PHD-LAB's and MixMo's PreActResNet Linear layers: 0.01)."""
    return lambda w: nn.init.normal_(w, 0.0, std)


def make_linear(in_features: int, out_features: int, bias: bool = True, *, default_init: bool) -> nn.Linear:
    """An ``nn.Linear``; with ``default_init`` (its recipe is PyTorch's own) its parameters are left for
    :func:`init_modules` to draw (module doc), else its constructor draws them as usual."""
    if default_init:
        return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


@torch.no_grad()
def init_modules(module: nn.Module, conv: WeightInit | None = None, linear: WeightInit | None = None) -> nn.Module:
    """Apply a recipe by module kind to every submodule of ``module``, in place; returns ``module``.

    ``conv`` / ``linear`` draw the weight of every Conv2d / Linear (biases 0); None means PyTorch's
    default (``reset_parameters``), applied first (module doc). Normalisation layers get weight 1,
    bias 0 and fresh running statistics; any other module with its own ``reset_parameters`` (PReLU,
    SReLU) is reset.
    """
    mods = list(module.modules())
    kinds = ((nn.Conv2d, conv), (nn.Linear, linear))
    for m in mods:
        if any(isinstance(m, cls) and init is None for cls, init in kinds):
            m.reset_parameters()
    for m in mods:
        init = next((init for cls, init in kinds if isinstance(m, cls)), False)
        if init:
            init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "track_running_stats", False):
                m.reset_running_stats()
        elif init is False and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class Backbone(nn.Module):
    """Base of every backbone: the four seams, ``features``/``forward`` and the init recipe.

    Subclasses build ``stem``, ``body``, ``pool``, ``head`` and set ``stem_channels`` and
    ``feature_dim`` in ``__init__``, then call ``self.init_weights(self)``.
    """

    stem: nn.Module
    body: nn.Module
    pool: nn.Module
    head: nn.Module
    stem_channels: int
    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, feature_dim): ``pool(body(stem(x)))``."""
        return self.pool(self.body(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes): ``head(features(x))``."""
        return self.head(self.features(x))

    def init_weights(self, module: nn.Module) -> nn.Module:
        """Re-draw the parameters of ``module`` in place with this backbone's recipe; returns ``module``.

        The default is PyTorch's own initialisation with normalisation layers at weight 1, bias 0
        (:func:`init_modules`). Backbones with a paper recipe override it; ``module`` may be the backbone
        itself, one of its parts, or a copy of a part (MixMo's member stems and heads). Draws come from
        the global generator.
        """
        return init_modules(module)

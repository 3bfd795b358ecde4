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
"""

from __future__ import annotations

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> nn.Module:
        """Re-draw the parameters of ``module`` in place with this backbone's recipe; returns ``module``.

        The default is PyTorch's own initialisation (``reset_parameters``) with normalisation layers at
        weight 1, bias 0. Backbones with a paper recipe override it; ``module`` may be the backbone
        itself, one of its parts, or a copy of a part (MixMo's member stems and heads).
        """
        for m in module.modules():
            if isinstance(m, _NORMS):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return module

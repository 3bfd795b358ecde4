"""Backbones split at the seams ``stem -> body -> pool -> head`` (ARCHITECTURE.md, "The one idea").

Every backbone is a :class:`Backbone` built as ``Backbone(num_classes, image_shape, **options)``
with attributes ``stem``, ``body``, ``pool``, ``head``, ``feature_dim`` (input size of ``head``)
and ``stem_channels`` (output channels of ``stem``), ``forward(x) == head(features(x))``,
``features(x) == pool(body(stem(x)))`` and ``init_weights(module)`` (the backbone's own init recipe).
The backbone classes are the :class:`Backbone` subclasses in ``__all__`` (a test can list them from there).
"""

from .base import Backbone
from .mlp import MLP
from .pi_mlp import PiMLP
from .preact_resnet import PreActResNet
from .resnet import CifarResNet, ResNet
from .vgg import VGG
from .wide_resnet import SReLU, WideResNet, isometry_convs

__all__ = ["Backbone", "MLP", "CifarResNet", "PiMLP", "PreActResNet", "ResNet", "SReLU", "VGG",
           "WideResNet", "isometry_convs"]

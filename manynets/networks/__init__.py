"""Backbones split at the seams ``stem -> body -> pool -> head`` (ARCHITECTURE.md, "The one idea").

Every backbone is a plain ``nn.Module`` built as ``Backbone(num_classes, image_shape, **options)``
with attributes ``stem``, ``body``, ``pool``, ``head``, ``feature_dim`` (input size of ``head``)
and ``stem_channels`` (output channels of ``stem``), and
``forward(x) == head(features(x))``, ``features(x) == pool(body(stem(x)))``.
"""

from .base import Backbone
from .mlp import MLP
from .preact_resnet import PreActResNet
from .resnet import CifarResNet, ResNet
from .vgg import VGG
from .wide_resnet import SReLU, WideResNet, isometry_convs

__all__ = ["Backbone", "MLP", "CifarResNet", "PreActResNet", "ResNet", "SReLU", "VGG", "WideResNet", "isometry_convs"]

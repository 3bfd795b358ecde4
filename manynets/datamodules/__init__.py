"""Data modules: every one yields normalised float images and int64 labels (see ``base.py``)."""

from manynets.datamodules.base import DataError, ImageDataModule, require_path
from manynets.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from manynets.datamodules.corruptions import CIFARCorruptionsDataModule
from manynets.datamodules.digits import DigitsDataModule
from manynets.datamodules.imagenet32 import ImageNet32DataModule
from manynets.datamodules.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARCorruptionsDataModule",
    "DataError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNet32DataModule",
    "TinyImageNetDataModule",
    "require_path",
]

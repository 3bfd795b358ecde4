"""Handwritten digits shipped with scikit-learn: real data that needs no download.

The UCI optical-recognition digits (1797 images of 8x8 pixels, 16 grey levels,
10 classes; ``sklearn.datasets.load_digits``) are upscaled bilinearly to
``size`` x ``size`` and stored once as one uint8 tensor. A fixed seeded split
holds out ``test_size`` images as the test set; the base class then holds out
``val_split`` of the rest for validation. It is the default data set of the
quickstart, the examples and the end-to-end tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from manynets.datamodules.base import ImageDataModule, UInt8ImageDataset
from manynets.errors import check_arg


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits resized to ``size`` px with ``channels`` channels (grey replicated).

    Args:
        size: side of the resized images.
        channels: 1 (grey) or 3 (grey replicated, for backbones with an RGB stem).
        test_size: images held out as the test set (fixed split, ``split_seed``).
        split_seed: seed of the test split (kept apart from ``seed``, the train/val split).
        batch_size: training batch size (per process under DDP); smaller default than the base's.
        eval_batch_size: batch size for validation and test (``null``: ``batch_size``).
        val_split: number (int) or fraction (0 < x < 1) of the training images held out for
            validation, drawn with ``seed``; ``0`` validates on the test set (warns).
        augment: random crop with padding 4 on the training images, no horizontal flip (digits are not
            mirror-symmetric).
        on_device: keep the images (about 5 MB at 32 px, 3 channels) on the training device and crop and
            normalise batches there (see :class:`~manynets.datamodules.base.ImageDataModule`).
    """

    num_classes = 10
    horizontal_flip = False
    mean, std = (0.3052,), (0.3236,)  # of the resized images at 32 px, all 1797; the same for every channel

    def __init__(
        self,
        size: int = 32,
        channels: int = 3,
        test_size: int = 360,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        val_split: int | float = 180,
        **kwargs,
    ) -> None:
        d = "data.init_args."
        check_arg(channels in (1, 3), d + "channels", channels, "1 (grey) or 3 (grey replicated)")
        check_arg(size >= 1, d + "size", size, "an image side >= 1 px", "The digits are 8 x 8; 32 by default.")
        check_arg(1 <= test_size < 1797, d + "test_size", test_size, "1..1796 of the 1797 images", "360 by default.")
        self.size, self.channels, self.test_size, self.split_seed = size, channels, test_size, split_seed
        self.image_shape = (channels, size, size)  # before the base, which gives mean/std one value per channel
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, val_split=val_split, **kwargs)
        self._images: torch.Tensor | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32, device="cpu")[:, None] / 16.0
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, self.channels, -1, -1)
            self._images = x.contiguous()
            self._labels = torch.tensor(digits.target, dtype=torch.int64, device="cpu")
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed), device="cpu")
            self._test_idx, self._train_idx = perm[: self.test_size], perm[self.test_size :]
        return self._images, self._labels

    def train_set(self, transform) -> Dataset:
        images, labels = self._load()
        return UInt8ImageDataset(images[self._train_idx], labels[self._train_idx], transform)

    def test_sets(self, transform) -> dict[str, Dataset]:
        images, labels = self._load()
        return {"test": UInt8ImageDataset(images[self._test_idx], labels[self._test_idx], transform)}

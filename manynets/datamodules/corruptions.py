"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): corrupted CIFAR test sets.

The official folders (CIFAR-10-C: https://zenodo.org/records/2535967, CIFAR-100-C:
https://zenodo.org/records/3555552), untarred into ``data_dir`` next to the clean CIFAR files::

    <data_dir>/CIFAR-10-C/<corruption>.npy   uint8 (50000, 32, 32, 3), HWC
    <data_dir>/CIFAR-10-C/labels.npy         (50000,) labels
    (CIFAR-100-C likewise)

Severity s (1..5) occupies rows (s-1)*B : s*B with B = len(labels) / 5 (10000 in the official
files). There are 19 corruptions: the 15 of the benchmark plus 4 extra ones (speckle_noise,
gaussian_blur, spatter, saturate) that MixMo also pools. Here each corruption and severity is its
own test set named ``"{corruption}_s{severity}"``, after the clean CIFAR test set ``"clean"``; the
classifier module averages the per-set metrics. Training and validation come from the clean
CIFAR data module. Files are memory-mapped copy-on-write (as light as read-only, but writable so
torch can wrap them; the files are never modified).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from manynets.datamodules.base import DataError, ImageDataModule, require_path
from manynets.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from manynets.errors import check_arg
from manynets.datamodules.base import UInt8ImageDataset

BENCHMARK = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK + EXTRA
SOURCES = {"cifar10": ("CIFAR-10-C", "https://zenodo.org/records/2535967"),
           "cifar100": ("CIFAR-100-C", "https://zenodo.org/records/3555552")}  # fmt: skip


class CIFARCorruptionsDataModule(ImageDataModule):
    """Clean CIFAR for training, then the clean test set and every corruption x severity as test sets.

    The :class:`~manynets.datamodules.base.ImageDataModule` arguments go to the clean CIFAR module too, whose
    statistics ``mean``/``std`` default to those of ``variant``.

    Args:
        variant: ``"cifar10"`` (CIFAR-10-C) or ``"cifar100"`` (CIFAR-100-C).
        corruptions: corruption names, in test-set order (``None``: all 19, see ``CORRUPTIONS``).
        severities: severities in 1..5, in test-set order.
        download: as in :class:`~manynets.datamodules.cifar.CIFAR10DataModule` (the download is of
            clean CIFAR only; the corrupted sets must be copied by hand).
        on_device: keep the clean training and test images and every requested corruption x severity test set
            on the training device (30 MB each: 2.9 GB for all 19 x 5) and crop, flip and normalise there (see
            :class:`~manynets.datamodules.base.ImageDataModule`).

    The corruption files are checked at ``setup`` of any stage, so a missing file fails before training.
    """

    image_shape = (3, 32, 32)

    def __init__(
        self,
        variant: Literal["cifar10", "cifar100"] = "cifar10",
        corruptions: list[str] | None = None,
        severities: list[int] = [1, 2, 3, 4, 5],  # noqa: B006 (never mutated; shown as-is in the CLI help)
        download: bool = False,
        **kwargs,
    ) -> None:
        d = "data.init_args."
        check_arg(variant in SOURCES, d + "variant", variant, "'cifar10' or 'cifar100'")
        self.clean = (CIFAR10DataModule if variant == "cifar10" else CIFAR100DataModule)(download=download, **kwargs)
        self.num_classes, self.mean, self.std = self.clean.num_classes, self.clean.mean, self.clean.std  # for the base
        super().__init__(**kwargs)
        corruptions = list(CORRUPTIONS if corruptions is None else corruptions)
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        check_arg(not unknown and bool(corruptions) and len(set(corruptions)) == len(corruptions), d + "corruptions",
                  corruptions, f"distinct names out of {list(CORRUPTIONS)}",
                  f"These are unknown: {unknown}." if unknown else "")
        distinct = len(set(severities)) == len(severities)
        check_arg(bool(severities) and distinct and set(severities) <= {1, 2, 3, 4, 5}, d + "severities", severities,
                  "distinct values out of 1..5")
        self.variant, self.corruptions, self.severities = variant, corruptions, list(severities)
        self._arrays: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

    @property
    def folder(self) -> Path:
        return self.data_dir / SOURCES[self.variant][0]

    def _load(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Map every requested file once and validate it: ``({corruption: uint8 (N,3,32,32) view}, labels)``."""
        if self._arrays is not None:
            return self._arrays
        name, url = SOURCES[self.variant]
        fix = f"Download {name}.tar from {url} and untar it into '{self.data_dir}'."
        require_path(self.folder, f"{name} folder", fix)
        labels = self._npy("labels", fix)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0 or len(labels) % 5:
            raise DataError(
                f"'{self.folder / 'labels.npy'}' holds {labels.dtype} {labels.shape}; expected integer labels, "
                f"5 equal severity blocks (50000 in the official file). {fix}"
            )
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"'{self.folder / 'labels.npy'}' has labels outside 0..{self.num_classes - 1}: "
                            f"is it the {name} file? {fix}")  # fmt: skip
        images = {}
        for c in self.corruptions:
            x = self._npy(c, fix)
            if x.dtype != np.uint8 or x.shape != (len(labels), 32, 32, 3):
                raise DataError(
                    f"'{self.folder / (c + '.npy')}' holds {x.dtype} {x.shape}; expected uint8 "
                    f"({len(labels)}, 32, 32, 3) to match labels.npy. {fix}"
                )
            images[c] = torch.from_numpy(x).permute(0, 3, 1, 2)  # a view: nothing is read here
        self._arrays = images, torch.from_numpy(np.asarray(labels, dtype=np.int64))
        return self._arrays

    def _npy(self, stem: str, fix: str) -> np.ndarray:
        path = require_path(self.folder / f"{stem}.npy", f"{SOURCES[self.variant][0]} file", fix)
        try:
            return np.load(path, mmap_mode="c" if stem != "labels" else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"'{path}' is corrupt or truncated ({e}). Delete it, then: {fix}") from e

    def setup(self, stage: str | None = None) -> None:
        self._load()
        super().setup(stage)

    def prepare_data(self) -> None:
        self.clean.prepare_data()

    def train_set(self, transform) -> Dataset:
        return self.clean.train_set(transform)

    def test_sets(self, transform) -> dict[str, Dataset]:
        images, labels = self._load()
        block = len(labels) // 5
        sets = {"clean": self.clean.test_sets(transform)["test"]}
        for c in self.corruptions:
            for s in self.severities:
                rows = slice((s - 1) * block, s * block)
                sets[f"{c}_s{s}"] = UInt8ImageDataset(images[c][rows], labels[rows], transform)
        return sets

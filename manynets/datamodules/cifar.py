"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python pickles.

The layout is the one of the official archives (https://www.cs.toronto.edu/~kriz/cifar.html),
as torchvision's ``CIFAR10``/``CIFAR100`` read it::

    <data_dir>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    <data_dir>/cifar-100-python/train, test, meta

Each data file is a pickled dict with ``data`` (uint8, N x 3072: 1024 R, then G, then B values
of a row-major 32x32 image) and ``labels`` (CIFAR-100: ``fine_labels``). Loading is torchvision's.
Every file is checked against the md5 that torchvision lists in the dataset class (``train_list``,
``test_list``, ``meta``: the files ``_check_integrity`` checks); when that check fails the files are
checked one by one so the error names the missing or corrupt one. Tests substitute the md5s of
their fake files by monkeypatching those class attributes (see ``tests/fakes.py``).

Label noise follows Wortsman et al. 2021 (learning neural network subspaces): the first
floor(N * label_noise) indices of a seeded permutation of the N training samples get a label drawn
uniformly over all classes (it may equal the true one). It is applied to the full training set,
before the train/val split, so validation labels are noisy too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from torchvision.transforms import v2

from manynets.datamodules.base import DataError, ImageDataModule
from manynets.errors import check_arg


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images of 32x32 px in 10 classes.

    Args:
        download: download and extract the official archive in ``prepare_data`` when the files
            are missing or corrupt (needs internet). Never downloads otherwise.
        label_noise: fraction of training samples relabelled uniformly at random (see module doc).
        label_noise_seed: seed of the relabelling (independent of ``seed``, the train/val split).
        resolution: resize every image to this side (bilinear, antialiased) after the augmentation,
            as PHD-LAB's ``resolution`` (RandomCrop(32, pad 4) -> flip -> Resize(res) -> Normalize);
            ``image_shape`` becomes (3, res, res). ``None``: native 32 px.
        on_device: keep the images on the training device (150 MB for training, 30 MB for the test set) and
            crop, flip, resize and normalise batches there (see
            :class:`~manynets.datamodules.base.ImageDataModule`).

    After setup, ``noisy_indices`` holds the (sorted) indices of the relabelled training samples.
    """

    dataset_cls: type[CIFAR10] = CIFAR10
    num_classes = 10
    image_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        *,
        download: bool = False,
        label_noise: float = 0.0,
        label_noise_seed: int = 0,
        resolution: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        d = "data.init_args."
        check_arg(0.0 <= label_noise <= 1.0, d + "label_noise", label_noise, "a fraction of the training set in [0, 1]",
                  "A fraction: 0.2, not 20.")
        check_arg(resolution is None or resolution >= 1, d + "resolution", resolution, "null or an image side >= 1 px")
        self.download = download
        self.label_noise = label_noise
        self.label_noise_seed = label_noise_seed
        self.resolution = resolution
        if resolution is not None:
            self.image_shape = (3, resolution, resolution)
        self.noisy_indices: torch.Tensor | None = None
        self._train: CIFAR10 | None = None
        self._test: CIFAR10 | None = None

    def train_transform(self):
        if self.resolution is None:
            return super().train_transform()
        ops: list = [v2.ToImage()]
        if self.augment:
            ops += [v2.RandomCrop(type(self).image_shape[1:], padding=self.crop_padding), v2.RandomHorizontalFlip()]
        return v2.Compose(ops + self._resize_and_normalise())

    def eval_transform(self):
        if self.resolution is None:
            return super().eval_transform()
        return v2.Compose([v2.ToImage(), *self._resize_and_normalise()])

    def batch_transform(self, device):
        normalise = super().batch_transform(device)
        if self.resolution is None:
            return normalise
        size = [self.resolution, self.resolution]
        return lambda x: normalise(v2.functional.resize(x, size, antialias=True))

    def _resize_and_normalise(self) -> list:
        return [v2.Resize((self.resolution, self.resolution), antialias=True),
                v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]  # fmt: skip

    @property
    def folder(self) -> Path:
        return self.data_dir / self.dataset_cls.base_folder

    def _fix(self) -> str:
        cls = self.dataset_cls
        return (
            f"Set --data.download=true on a machine with internet access, or download {cls.url} "
            f"(md5 {cls.tgz_md5}) and extract it into '{self.data_dir}' so that '{self.folder}' holds the files."
        )

    def _files(self) -> list[tuple[str, str]]:
        cls = self.dataset_cls
        return [tuple(f) for f in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]

    def _check_files(self) -> None:
        """Raise :class:`DataError` naming the first missing or corrupt file."""
        for name, md5 in self._files():
            path = self.folder / name
            if not path.is_file():
                raise DataError(f"{self.dataset_cls.__name__} file '{path}' not found. {self._fix()}")
            if not check_integrity(str(path), md5):
                raise DataError(
                    f"{self.dataset_cls.__name__} file '{path}' is corrupt or truncated (its md5 is not the "
                    f"official {md5}). Delete '{self.folder}', then: {self._fix()}"
                )

    def prepare_data(self) -> None:
        if not self.download or all(check_integrity(str(self.folder / n), m) for n, m in self._files()):
            return
        cls = self.dataset_cls
        try:
            download_and_extract_archive(cls.url, str(self.data_dir), filename=cls.filename, md5=cls.tgz_md5)
        except OSError as e:  # URLError is an OSError
            raise DataError(
                f"Downloading {cls.url} into '{self.data_dir}' failed ({e}). Without internet, copy the official "
                f"archive {cls.filename} there and extract it, then set --data.download=false."
            ) from e

    def _load(self, train: bool) -> CIFAR10:
        try:
            return self.dataset_cls(str(self.data_dir), train=train)
        except RuntimeError as e:  # torchvision's integrity check failed: say which file and how to fix it
            self._check_files()
            raise DataError(f"Could not load {self.dataset_cls.__name__} from '{self.folder}': {e}") from e

    def _noisy_targets(self, targets: list[int]) -> list[int]:
        n = len(targets)
        k = int(n * self.label_noise + 1e-9)  # floor, robust to 0.29 * 100 = 28.999...
        g = torch.Generator().manual_seed(self.label_noise_seed)
        idx = torch.randperm(n, generator=g, device="cpu")[:k]
        noisy = torch.as_tensor(targets, dtype=torch.int64).clone()
        noisy[idx] = torch.randint(self.num_classes, (k,), generator=g)
        self.noisy_indices = idx.sort().values
        return noisy.tolist()

    def train_set(self, transform) -> Dataset:
        if self._train is None:
            self._train = self._load(train=True)
            if self.label_noise > 0:
                self._train.targets = self._noisy_targets(self._train.targets)
        view = copy.copy(self._train)  # shares the image array (and the targets list), not a copy
        view.transform = transform
        return view

    def test_sets(self, transform) -> dict[str, Dataset]:
        if self._test is None:
            self._test = self._load(train=False)
        view = copy.copy(self._test)
        view.transform = transform
        return {"test": view}


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 training and 10,000 test images of 32x32 px in 100 (fine) classes.

    Same arguments as :class:`CIFAR10DataModule`; labels are the ``fine_labels``.
    """

    dataset_cls = CIFAR100
    num_classes = 100
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)

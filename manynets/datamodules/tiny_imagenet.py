"""Tiny ImageNet (Stanford CS231n): 200 classes of 64x64 px, 500 training images per class.

Read from the official ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip)
exactly as unzipped into ``data_dir``::

    tiny-imagenet-200/wnids.txt                       200 WordNet ids; class index = line order
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      training images
    tiny-imagenet-200/val/images/*.JPEG               the official validation images ...
    tiny-imagenet-200/val/val_annotations.txt         ... labelled by tab-separated lines
                                                      "filename  wnid  x0  y0  x1  y1"

The official test images have no labels, so the official validation set is the test set here
(named ``"test"``), as in MixMo and the subspaces paper; validation is held out of the training
set. Images are decoded with PIL and converted to RGB (some are greyscale). The file list is built
once; with ``in_memory`` every image is decoded once into one uint8 (N, 3, 64, 64) tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from manynets.datamodules.base import DataError, ImageDataModule, require_path
from manynets.datamodules.base import UInt8ImageDataset

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def load_rgb(path: Path, size: tuple[int, int]) -> Image.Image:
    """Decode ``path`` as an RGB PIL image of ``size`` (W, H); :class:`DataError` if it is unreadable."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"Image '{path}' is corrupt or unreadable ({e}); unzip {URL} again.") from e
    if image.size != size:
        raise DataError(f"Image '{path}' is {image.size[0]}x{image.size[1]} px, expected {size[0]}x{size[1]}.")
    return image


class ImageFiles(Dataset):
    """Image files decoded on access; ``labels`` are ints."""

    def __init__(self, files: list[Path], labels: list[int], size: tuple[int, int], transform=None) -> None:
        self.files, self.labels, self.size, self.transform = files, labels, size, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = load_rgb(self.files[i], self.size)
        return (self.transform(image) if self.transform else image), self.labels[i]


class TinyImageNetDataModule(ImageDataModule):
    """Tiny ImageNet from the official folder (see module doc).

    Args:
        in_memory: decode all images once into one uint8 tensor (about 1.2 GB for the training
            set) instead of decoding files on every access.
        on_device: decode all images once (as ``in_memory``, whatever its value) and keep them on the training
            device, 1.2 GB for training and 0.12 GB for the test set, with crop, flip and normalisation there
            (see :class:`~manynets.datamodules.base.ImageDataModule`).

    A copy with fewer than 200 classes in ``wnids.txt`` loads too; the head keeps 200 outputs.
    """

    num_classes = 200
    image_shape = (3, 64, 64)
    mean = (0.480, 0.448, 0.397)  # the subspaces paper's; MixMo's configs set 0.5 / 0.5
    std = (0.276, 0.269, 0.282)

    def __init__(self, *, in_memory: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.in_memory = in_memory or self.on_device
        self._index: dict[str, tuple[list[Path], list[int]]] | None = None
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def folder(self) -> Path:
        return self.data_dir / "tiny-imagenet-200"

    def _build_index(self) -> dict[str, tuple[list[Path], list[int]]]:
        fix = f"Download {URL} and unzip it into '{self.data_dir}'."
        root = require_path(self.folder, "Tiny ImageNet folder", fix)
        wnids_file = require_path(root / "wnids.txt", "Tiny ImageNet class list", fix)
        wnids = wnids_file.read_text().split()
        if not wnids or len(set(wnids)) != len(wnids) or len(wnids) > self.num_classes:
            raise DataError(
                f"'{wnids_file}' must list at most {self.num_classes} distinct wnids, one a line; "
                f"it lists {len(wnids)} ({len(set(wnids))} distinct). {fix}"
            )
        label = {w: i for i, w in enumerate(wnids)}

        train_files, train_labels = [], []
        for wnid in wnids:
            folder = require_path(root / "train" / wnid / "images", f"Training images of class {wnid}", fix)
            files = sorted(folder.glob("*.JPEG"))
            if not files:
                raise DataError(f"No .JPEG images in '{folder}'. {fix}")
            train_files += files
            train_labels += [label[wnid]] * len(files)

        images = require_path(root / "val" / "images", "Tiny ImageNet validation images", fix)
        annotations = require_path(root / "val" / "val_annotations.txt", "Tiny ImageNet validation labels", fix)
        present = {p.name for p in images.iterdir()}
        test_files, test_labels = [], []
        for n, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 6:
                raise DataError(
                    f"'{annotations}' line {n} is {line!r}; expected 6 tab-separated fields "
                    f"'filename wnid x0 y0 x1 y1'. {fix}"
                )
            name, wnid = fields[0], fields[1]
            if wnid not in label:
                raise DataError(f"'{annotations}' line {n} names wnid '{wnid}', which is not in '{wnids_file}'. {fix}")
            if name not in present:
                raise DataError(f"'{annotations}' line {n} names '{images / name}', which does not exist. {fix}")
            test_files.append(images / name)
            test_labels.append(label[wnid])
        if not test_files:
            raise DataError(f"'{annotations}' lists no images. {fix}")
        return {"train": (train_files, train_labels), "test": (test_files, test_labels)}

    def _dataset(self, split: str, transform) -> Dataset:
        if self._index is None:
            self._index = self._build_index()
        files, labels = self._index[split]
        size = (self.image_shape[2], self.image_shape[1])
        if not self.in_memory:
            return ImageFiles(files, labels, size, transform)
        if split not in self._decoded:
            images = torch.empty((len(files), *self.image_shape), dtype=torch.uint8, device="cpu")
            for i, path in enumerate(files):
                images[i] = torch.from_numpy(np.array(load_rgb(path, size))).permute(2, 0, 1)
            self._decoded[split] = images, torch.tensor(labels, dtype=torch.int64, device="cpu")
        return UInt8ImageDataset(*self._decoded[split], transform)

    def train_set(self, transform) -> Dataset:
        return self._dataset("train", transform)

    def test_sets(self, transform) -> dict[str, Dataset]:
        return {"test": self._dataset("test", transform)}

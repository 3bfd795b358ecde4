"""Downsampled ImageNet 32x32 (Chrabaszcz, Loshchilov & Hutter 2017, arXiv:1707.08819).

The official pickle files ("Downsampled ImageNet 32x32" on https://image-net.org/download-images.php,
``Imagenet32_train.zip`` and ``Imagenet32_val.zip``), unzipped flat into ``data_dir``::

    <data_dir>/train_data_batch_1 ... train_data_batch_10, val_data

Each is a pickled dict: ``data`` uint8 (N, 3072), each row the 1024 R, then G, then B values of a
row-major 32x32 image; ``labels`` a list of ints 1..1000; training batches also hold ``mean``.
The official validation set is the test set here (``"test"``). Labels are made 0-based.

We know of no published checksums or file sizes for these files, so they are checked structurally:
non-empty, unpickled by a restricted unpickler (builtins and numpy arrays only: a pickle can run
code), then keys, dtypes, shapes and label range. The images go into one preallocated uint8
(N, 3, 32, 32) array filled batch by batch; its size is bounded by the file sizes (3072 bytes per
image), and the unused tail of that bound is never touched, so it costs no memory.

``num_classes_subset`` keeps a seeded random subset of the classes (the pi-net transfer experiment
trains on 250; Yang, Santacroce & Hu, ICLR 2022); labels are remapped to 0..k-1 in the sorted order of the
chosen classes, whose original 0-based indices are ``class_subset``.
"""

from __future__ import annotations

import builtins
import codecs
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from manynets.datamodules.base import DataError, ImageDataModule, require_path
from manynets.datamodules.base import UInt8ImageDataset
from manynets.errors import check_arg

PAGE = "https://image-net.org/download-images.php"
TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
TEST_FILE = "val_data"
ROW = 3 * 32 * 32

_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
for _core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings of the same functions
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = np.float64(0).__reduce__()[0]
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
_SAFE_BUILTINS = {
    "list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "int", "float", "complex", "str", "bool"
}  # fmt: skip


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class SafeUnpickler(pickle.Unpickler):
    """Unpickles builtins containers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise _ForbiddenGlobal(f"{module}.{name}")


def _fix(folder: Path, verb: str) -> str:
    return f"{verb} it from {PAGE} (Downsampled ImageNet 32x32, the pickle version) and unzip it into '{folder}'."


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 (N, 3072), labels int64 (N,) in 0..999)`` of one official file, validated."""
    path = require_path(path, "ImageNet32 file", _fix(path.parent, "Download"))
    fix = _fix(path.parent, "Re-download")
    if path.stat().st_size < ROW:
        raise DataError(f"ImageNet32 file '{path}' is {path.stat().st_size} bytes: empty or truncated. {fix}")
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DataError(
            f"Refusing to unpickle '{path}': it references {e}, which no ImageNet32 file does. {fix}"
        ) from e
    except Exception as e:  # truncation shows as EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"ImageNet32 file '{path}' is corrupt or truncated ({type(e).__name__}: {e}). {fix}") from e
    if not isinstance(batch, dict) or not {"data", "labels"} <= set(batch):
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"ImageNet32 file '{path}' holds {keys}; expected a dict with keys 'data' and 'labels'. {fix}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"'data' in ImageNet32 file '{path}' is {what}; expected uint8 (N, {ROW}) (the 32x32 version?). {fix}"
        )
    ok = labels.shape == (len(data),) and labels.dtype.kind in "iu"
    if not ok or (labels.size and (labels.min() < 1 or labels.max() > 1000)):
        got = f"shape {labels.shape}, dtype {labels.dtype}" + (f", range {labels.min()}..{labels.max()}" if ok else "")
        raise DataError(f"'labels' in ImageNet32 file '{path}' must be {len(data)} ints in 1..1000; got {got}. {fix}")
    return data, labels.astype(np.int64) - 1


class ImageNet32DataModule(ImageDataModule):
    """ImageNet 32x32: 1000 classes (or a seeded subset), official validation set as the test set.

    Args:
        num_classes_subset: keep only this many classes, drawn with ``subset_seed`` (``None``: all 1000).
        subset_seed: seed of the class draw.
        on_device: keep the images on the training device (all 1000 classes: about 3.9 GB for training and
            0.15 GB for the test set, in each process) and crop, flip and normalise batches there (see
            :class:`~manynets.datamodules.base.ImageDataModule`).

    All 1000 classes take about 3.9 GB of memory (1,281,167 x 3072 bytes), 250 classes about a quarter.
    """

    num_classes = 1000
    image_shape = (3, 32, 32)
    mean = (0.485, 0.456, 0.406)  # the ImageNet statistics
    std = (0.229, 0.224, 0.225)

    def __init__(self, *, num_classes_subset: int | None = None, subset_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_arg(num_classes_subset is None or 1 <= num_classes_subset <= 1000, "data.init_args.num_classes_subset",
                  num_classes_subset, "null (all 1000 classes) or 1..1000", "The transfer protocol uses 250.")
        self.num_classes_subset, self.subset_seed = num_classes_subset, subset_seed
        self.class_subset: list[int] | None = None
        self._lut = np.arange(1000)  # original 0-based class -> new label, -1 = dropped
        if num_classes_subset is not None:
            g = torch.Generator().manual_seed(subset_seed)
            self.class_subset = sorted(torch.randperm(1000, generator=g, device="cpu")[:num_classes_subset].tolist())
            self.num_classes = num_classes_subset
            self._lut = np.full(1000, -1)
            self._lut[self.class_subset] = np.arange(num_classes_subset)
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _read(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [self.data_dir / n for n in names]
        for p in paths:  # fail before reading gigabytes
            require_path(p, "ImageNet32 file", _fix(self.data_dir, "Download"))
        capacity = sum(p.stat().st_size // ROW for p in paths)
        images = np.empty((capacity, 3, 32, 32), dtype=np.uint8)  # pages are committed only when written
        labels = np.empty(capacity, dtype=np.int64)
        n = 0
        for p in paths:
            data, y = read_batch(p)
            y = self._lut[y]
            if self.class_subset is not None:
                data, y = data[y >= 0], y[y >= 0]
            images[n : n + len(y)] = data.reshape(-1, 3, 32, 32)
            labels[n : n + len(y)] = y
            n += len(y)
            del data
        return torch.from_numpy(images[:n]), torch.from_numpy(labels[:n])

    def train_set(self, transform) -> Dataset:
        if "train" not in self._loaded:
            self._loaded["train"] = self._read(TRAIN_FILES)
        return UInt8ImageDataset(*self._loaded["train"], transform)

    def test_sets(self, transform) -> dict[str, Dataset]:
        if "test" not in self._loaded:
            self._loaded["test"] = self._read((TEST_FILE,))
        return {"test": UInt8ImageDataset(*self._loaded["test"], transform)}

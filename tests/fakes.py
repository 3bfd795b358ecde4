"""Tiny data sets written in each official on-disk format, for tests (no download needed).

Each writer returns a ``SimpleNamespace`` with what it wrote (arrays, labels, paths) so tests can
check that the data modules read the right thing. torchvision checks the md5 of every CIFAR file
against the lists in its dataset class; :func:`cifar_md5_attrs` gives those attributes for the fake
files and tests install them with ``monkeypatch.setattr`` (then truncating a file is detected).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(obj, path: Path, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _rows(images_hwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the official (N, 3072) rows: 1024 R, then G, then B values."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1))


def write_fake_cifar10(root, n_train: int = 50, n_test: int = 10, seed: int = 0) -> SimpleNamespace:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; n_train split over 5 batches."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, n_train).tolist(), rng.integers(0, 10, n_test).tolist()
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump({"batch_label": f"training batch {b} of 5", "labels": [y_train[i] for i in idx],
               "data": _rows(train[idx]), "filenames": [f"img_{i}.png" for i in idx]},
              folder / f"data_batch_{b}")  # fmt: skip
    _dump({"batch_label": "testing batch 1 of 1", "labels": y_test, "data": _rows(test),
           "filenames": [f"test_{i}.png" for i in range(n_test)]}, folder / "test_batch")  # fmt: skip
    _dump({"num_cases_per_batch": 10000, "label_names": [f"class{i}" for i in range(10)], "num_vis": 3072},
          folder / "batches.meta")  # fmt: skip
    return SimpleNamespace(folder=folder, train=train, train_labels=y_train, test=test, test_labels=y_test)


def write_fake_cifar100(root, n_train: int = 50, n_test: int = 10, seed: int = 0) -> SimpleNamespace:
    """``root/cifar-100-python/{train, test, meta}`` with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    out = SimpleNamespace(folder=folder)
    for split, n in (("train", n_train), ("test", n_test)):
        images, fine = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n).tolist()
        _dump({"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"{split}ing batch 1 of 1",
               "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": _rows(images)},
              folder / split)  # fmt: skip
        setattr(out, split, images)
        setattr(out, f"{split}_labels", fine)
    names = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    _dump(names, folder / "meta")
    return out


def cifar_md5_attrs(dataset_cls, root) -> dict:
    """``{"train_list", "test_list", "meta"}`` of torchvision's ``dataset_cls`` with the md5s of the fake files."""
    folder = Path(root) / dataset_cls.base_folder
    return {
        "train_list": [[name, _md5(folder / name)] for name, _ in dataset_cls.train_list],
        "test_list": [[name, _md5(folder / name)] for name, _ in dataset_cls.test_list],
        "meta": {**dataset_cls.meta, "md5": _md5(folder / dataset_cls.meta["filename"])},
    }


def write_fake_tiny_imagenet(root, n_classes: int = 3, n_per_class: int = 2, n_val: int = 4) -> SimpleNamespace:
    """``root/tiny-imagenet-200`` as unzipped: wnids.txt, words.txt, train/<wnid>/{images/*.JPEG, <wnid>_boxes.txt},
    val/{images/*.JPEG, val_annotations.txt}, test/images/*.JPEG. Each image is one solid colour that
    encodes its class (``colour(label)``); the first training image is greyscale ("L" mode)."""
    folder = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{1443537 + 1000 * i:08d}" for i in range(n_classes)]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(n_per_class):
            image = Image.new("RGB", (64, 64), colour(c))
            (image.convert("L") if c == k == 0 else image).save(images / f"{wnid}_{k}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{k}.JPEG\t0\t0\t63\t63\n" for k in range(n_per_class))
        )
    (folder / "val" / "images").mkdir(parents=True)
    val_labels = [k % n_classes for k in range(n_val)]
    for k, c in enumerate(val_labels):
        Image.new("RGB", (64, 64), colour(c)).save(folder / "val" / "images" / f"val_{k}.JPEG")
    (folder / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n" for k, c in enumerate(val_labels))
    )
    (folder / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "test" / "images" / "test_0.JPEG")
    return SimpleNamespace(folder=folder, wnids=wnids, val_labels=val_labels)


def colour(label: int) -> tuple[int, int, int]:
    """The solid colour of the fake Tiny ImageNet images of class ``label`` (well apart, JPEG-safe)."""
    return (40 + 50 * label % 200, 200 - 30 * label % 180, 120)


def write_fake_imagenet32(root, n_per_batch: int = 20, n_classes: int = 1000, n_val: int = 20,
                          seed: int = 0, protocol: int = 2) -> SimpleNamespace:  # fmt: skip
    """``root/train_data_batch_1..10`` and ``root/val_data``: pickled dicts with ``data`` uint8 (N, 3072),
    ``labels`` (list of 1-based ints drawn from 1..n_classes) and, in training batches, ``mean``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    train, train_labels = [], []
    for b in range(1, 11):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(1, n_classes + 1, n_per_batch)
        _dump({"data": data, "labels": labels.tolist(), "mean": data.mean(0)}, root / f"train_data_batch_{b}", protocol)
        train.append(data)
        train_labels.append(labels)
    val, val_labels = rng.integers(0, 256, (n_val, 3072), dtype=np.uint8), rng.integers(1, n_classes + 1, n_val)
    _dump({"data": val, "labels": val_labels.tolist()}, root / "val_data", protocol)
    return SimpleNamespace(root=root, train=np.concatenate(train), train_labels=np.concatenate(train_labels),
                           val=val, val_labels=val_labels)  # fmt: skip


def write_fake_cifar_c(root, variant: str = "cifar10", corruptions=("gaussian_noise", "fog"), n: int = 4):
    """``root/CIFAR-10-C/<corruption>.npy`` (uint8 (5n, 32, 32, 3)) and ``labels.npy`` (uint8 (5n,)).

    Severity s occupies rows (s-1)*n : s*n (the official files have n = 10000). Every pixel of
    corruption j, severity s is ``pixel(j, s)``; label of row i within block s is ``(i + s) % classes``.
    """
    folder = Path(root) / ("CIFAR-10-C" if variant == "cifar10" else "CIFAR-100-C")
    folder.mkdir(parents=True, exist_ok=True)
    classes = 10 if variant == "cifar10" else 100
    labels = np.concatenate([(np.arange(n) + s) % classes for s in range(1, 6)]).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for j, c in enumerate(corruptions):
        x = np.concatenate([np.full((n, 32, 32, 3), pixel(j, s), np.uint8) for s in range(1, 6)])
        np.save(folder / f"{c}.npy", x)
    return SimpleNamespace(folder=folder, labels=labels, corruptions=list(corruptions))


def pixel(j: int, severity: int) -> int:
    """The pixel value of fake corruption number ``j`` at ``severity``."""
    return 10 * severity + 100 * j

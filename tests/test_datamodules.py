"""Data modules against fakes written in each official on-disk format (tests/fakes.py)."""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2

from jsonargparse import ArgumentParser

from fakes import (
    cifar_md5_attrs,
    colour,
    pixel,
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_cifar_c,
    write_fake_imagenet32,
    write_fake_tiny_imagenet,
)
from manynets.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARCorruptionsDataModule,
    DataError,
    DigitsDataModule,
    ImageDataModule,
    ImageNet32DataModule,
    TinyImageNetDataModule,
)


def raw(image: torch.Tensor, dm) -> np.ndarray:
    """Undo the normalisation: uint8 (C, H, W)."""
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    return ((image * std + mean) * 255).round().to(torch.uint8).numpy()


def use_fake_md5(monkeypatch, dataset_cls, root) -> None:
    for name, value in cifar_md5_attrs(dataset_cls, root).items():
        monkeypatch.setattr(dataset_cls, name, value)


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    fake = write_fake_cifar10(tmp_path)
    use_fake_md5(monkeypatch, CIFAR10, tmp_path)
    return fake


# -- CIFAR ---------------------------------------------------------------------------------------
def test_cifar10_batches_are_normalised_float_and_int64(cifar10, tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, val_split=10, batch_size=8, augment=False)
    assert (dm.num_classes, dm.image_shape) == (10, (3, 32, 32))
    assert (dm.mean, dm.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (40, 10)
    for i in range(3):
        image, label = dm.val_dataset[i]
        j = dm.val_dataset.indices[i]
        assert np.array_equal(raw(image, dm), cifar10.train[j].transpose(2, 0, 1)) and label == cifar10.train_labels[j]
    dm.setup("test")
    assert dm.test_set_names == ["test"]
    image, label = dm.test_datasets["test"][3]
    assert np.array_equal(raw(image, dm), cifar10.test[3].transpose(2, 0, 1)) and label == cifar10.test_labels[3]


def test_cifar100_reads_fine_labels_and_stats(tmp_path, monkeypatch):
    fake = write_fake_cifar100(tmp_path)
    use_fake_md5(monkeypatch, CIFAR100, tmp_path)
    dm = CIFAR100DataModule(data_dir=tmp_path, val_split=0.2)
    assert (dm.num_classes, dm.mean, dm.std) == (100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    dm.setup("test")
    image, label = dm.test_datasets["test"][5]
    assert label == fake.test_labels[5] and np.array_equal(raw(image, dm), fake.test[5].transpose(2, 0, 1))
    dm.setup("fit")
    assert len(dm.val_dataset) == 10


def test_mean_std_override(cifar10, tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), val_split=0.1)
    assert (dm.mean, dm.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dm.setup("test")
    image, _ = dm.test_datasets["test"][0]
    assert torch.allclose(image, (torch.from_numpy(cifar10.test[0].transpose(2, 0, 1)) / 255 - 0.5) / 0.25, atol=1e-6)


def test_split_is_seeded_and_disjoint(cifar10, tmp_path):
    def split(seed):
        dm = CIFAR10DataModule(data_dir=tmp_path, val_split=10, seed=seed)
        dm.setup("fit")
        return dm.train_dataset.indices, dm.val_dataset.indices

    train, val = split(1)
    assert split(1) == (train, val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert split(2)[1] != val


def test_val_split_zero_warns_and_validates_on_test(cifar10, tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, val_split=0)
    with pytest.warns(UserWarning, match="val_split=0"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 50 and len(dm.val_dataset) == 10
    assert np.array_equal(raw(dm.val_dataset[2][0], dm), cifar10.test[2].transpose(2, 0, 1))


def test_augmentation_is_switchable(cifar10, tmp_path):
    plain = CIFAR10DataModule(data_dir=tmp_path, val_split=0.2, augment=False)
    plain.setup("fit")
    j = plain.train_dataset.indices[0]
    assert np.array_equal(raw(plain.train_dataset[0][0], plain), cifar10.train[j].transpose(2, 0, 1))
    dm = CIFAR10DataModule(data_dir=tmp_path, val_split=0.2, augment=True)
    ops = {type(t) for t in dm.train_transform().transforms}
    assert {v2.RandomCrop, v2.RandomHorizontalFlip} <= ops
    dm.setup("fit")
    torch.manual_seed(0)
    assert any(not torch.equal(dm.train_dataset[0][0], plain.train_dataset[0][0]) for _ in range(10))


def test_label_noise_is_a_seeded_fraction(tmp_path, monkeypatch):
    fake = write_fake_cifar10(tmp_path, n_train=1000, n_test=5)
    use_fake_md5(monkeypatch, CIFAR10, tmp_path)

    def targets(noise, seed):
        dm = CIFAR10DataModule(data_dir=tmp_path, val_split=100, label_noise=noise, label_noise_seed=seed)
        dm.setup("fit")
        assert dm.train_dataset.dataset.data is dm.val_dataset.dataset.data  # views of one image array
        return np.array(dm.train_dataset.dataset.targets), dm.noisy_indices

    clean = np.array(fake.train_labels)
    assert np.array_equal(targets(0.0, 0)[0], clean)
    noisy, idx = targets(0.3, 0)
    assert len(idx) == 300 and len(set(idx.tolist())) == 300
    changed = np.flatnonzero(noisy != clean)
    assert set(changed) <= set(idx.tolist()) and 200 < len(changed) < 300  # ~ 0.9 * 300 expected
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, idx_again = targets(0.3, 0)
    assert np.array_equal(again, noisy) and torch.equal(idx_again, idx)
    assert not np.array_equal(targets(0.3, 1)[0], noisy)
    with pytest.raises(ValueError, match="label_noise"):
        CIFAR10DataModule(data_dir=tmp_path, label_noise=1.5)


def test_cifar_missing_files_name_path_and_fix(tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"cifar-10-batches-py[/\\]data_batch_1' not found") as e:
        dm.setup("fit")
    assert "--data.download=true" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)


def test_cifar_truncated_file_is_reported(cifar10, tmp_path):
    path = cifar10.folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3' is corrupt or truncated") as e:
        CIFAR10DataModule(data_dir=tmp_path).setup("fit")
    assert "--data.download=true" in str(e.value)


def test_prepare_data_does_not_download_intact_files(cifar10, tmp_path):
    CIFAR10DataModule(data_dir=tmp_path, download=True).prepare_data()  # would fail without internet otherwise


# -- Tiny ImageNet -------------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [False, True])
def test_tiny_imagenet(tmp_path, in_memory):
    fake = write_fake_tiny_imagenet(tmp_path, n_classes=3, n_per_class=2, n_val=4)
    dm = TinyImageNetDataModule(data_dir=tmp_path, val_split=2, batch_size=2, augment=False, in_memory=in_memory)
    assert (dm.num_classes, dm.image_shape) == (200, (3, 64, 64))
    assert (dm.mean, dm.std) == ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282))
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert dm.test_set_names == ["test"]
    test = dm.test_datasets["test"]
    assert [int(test[k][1]) for k in range(4)] == fake.val_labels
    for k in range(4):
        mean_colour = raw(test[k][0], dm).reshape(3, -1).mean(1)
        assert np.allclose(mean_colour, colour(fake.val_labels[k]), atol=3)
    grey, label = dm.train_dataset.dataset[0]  # class 0, first image: saved greyscale, read as RGB
    assert label == 0 and grey.shape == (3, 64, 64)
    assert np.array_equal(raw(grey, dm)[0], raw(grey, dm)[2])


def test_tiny_imagenet_in_memory_matches_files(tmp_path):
    write_fake_tiny_imagenet(tmp_path)
    lazy, memory = (TinyImageNetDataModule(data_dir=tmp_path, in_memory=m, val_split=0) for m in (False, True))
    a, b = lazy.test_sets(lazy.eval_transform())["test"], memory.test_sets(memory.eval_transform())["test"]
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in range(len(a)))
    assert memory._decoded["test"][0].dtype == torch.uint8


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: os.rename(f, f.with_name("other")), r"Tiny ImageNet folder not found at '.*tiny-imagenet-200'"),
        (lambda f: (f / "wnids.txt").unlink(), r"class list not found at '.*wnids.txt'"),
        (lambda f: (f / "val/val_annotations.txt").unlink(), r"validation labels not found at '.*val_annotations.txt'"),
        (lambda f: (f / "val/images/val_1.JPEG").unlink(), r"line 2 names '.*val_1.JPEG', which does not exist"),
        (lambda f: (f / "val/val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t63\t63\n"),
         r"names wnid 'n99999999', which is not in '.*wnids.txt'"),
        (lambda f: (f / "val/val_annotations.txt").write_text("val_0.JPEG n01443537\n"), "6 tab-separated fields"),
    ],
)  # fmt: skip
def test_tiny_imagenet_errors(tmp_path, damage, message):
    damage(write_fake_tiny_imagenet(tmp_path).folder)
    with pytest.raises(DataError, match=message) as e:
        TinyImageNetDataModule(data_dir=tmp_path).setup("test")
    assert "tiny-imagenet-200.zip" in str(e.value)


# -- ImageNet32 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_imagenet32_reads_chw_rows_and_zero_based_labels(tmp_path, protocol):
    fake = write_fake_imagenet32(tmp_path, n_per_batch=6, n_val=5, protocol=protocol)
    dm = ImageNet32DataModule(data_dir=tmp_path, val_split=10, batch_size=4)
    assert (dm.num_classes, dm.image_shape, dm.class_subset) == (1000, (3, 32, 32), None)
    assert (dm.mean, dm.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dm.setup()
    data = dm.train_dataset.dataset
    assert data.images.shape == (60, 3, 32, 32) and data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert np.array_equal(data.images[7, 1].numpy(), fake.train[7, 1024:2048].reshape(32, 32))  # G plane
    assert np.array_equal(data.labels.numpy(), fake.train_labels - 1)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    test = dm.test_datasets["test"]
    assert len(test) == 5 and int(test[2][1]) == fake.val_labels[2] - 1
    assert np.array_equal(raw(test[2][0], dm), fake.val[2].reshape(3, 32, 32))


def test_imagenet32_class_subset_is_seeded_and_remapped(tmp_path):
    fake = write_fake_imagenet32(tmp_path, n_per_batch=40, n_val=40)
    dm = ImageNet32DataModule(data_dir=tmp_path, num_classes_subset=300, subset_seed=3, val_split=0.1)
    assert dm.num_classes == 300 and len(dm.class_subset) == 300 and dm.class_subset == sorted(dm.class_subset)
    assert ImageNet32DataModule(num_classes_subset=300, subset_seed=3).class_subset == dm.class_subset
    assert ImageNet32DataModule(num_classes_subset=300, subset_seed=4).class_subset != dm.class_subset
    for split, data, labels in (("train", fake.train, fake.train_labels), ("test", fake.val, fake.val_labels)):
        keep = np.isin(labels - 1, dm.class_subset)
        got = dm.train_set(None) if split == "train" else dm.test_sets(None)["test"]
        assert 0 < len(got) == keep.sum() < len(labels)
        assert np.array_equal(got.labels.numpy(), np.searchsorted(dm.class_subset, labels[keep] - 1))
        assert np.array_equal(got.images.reshape(len(got), -1).numpy(), data[keep])
    with pytest.raises(ValueError, match="num_classes_subset"):
        ImageNet32DataModule(num_classes_subset=1001)


class _Evil:
    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:5000]), "is corrupt or truncated"),
        (lambda p: p.write_bytes(b""), "is 0 bytes: empty or truncated"),
        (lambda p: p.unlink(), "ImageNet32 file not found at"),
        (lambda p: p.write_bytes(pickle.dumps({"images": np.zeros((2, 3072), np.uint8), "labels": [1, 2]})),
         r"holds \['images', 'labels'\]; expected a dict with keys 'data' and 'labels'"),
        (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 12288), np.uint8), "labels": [1, 2]})),
         r"'data' in ImageNet32 file .* is uint8 \(2, 12288\); expected uint8 \(N, 3072\)"),
        (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 2]})),
         r"must be 2 ints in 1..1000; got shape \(2,\), dtype int64, range 0..2"),
        (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2], "x": _Evil()})),
         r"Refusing to unpickle .*: it references posix.getcwd"),
    ],
)  # fmt: skip
def test_imagenet32_bad_files(tmp_path, damage, message):
    write_fake_imagenet32(tmp_path, n_per_batch=2, n_val=2)
    damage(tmp_path / "train_data_batch_2")
    with pytest.raises(DataError, match=message) as e:
        ImageNet32DataModule(data_dir=tmp_path, val_split=2).setup("fit")
    assert "train_data_batch_2" in str(e.value) and "image-net.org" in str(e.value)


# -- CIFAR-10-C / CIFAR-100-C --------------------------------------------------------------------
def test_corruption_sets_are_named_and_sliced_by_severity(cifar10, tmp_path):
    fake = write_fake_cifar_c(tmp_path, "cifar10", ["gaussian_noise", "fog"], n=4)
    dm = CIFARCorruptionsDataModule(corruptions=["fog", "gaussian_noise"], severities=[3, 1], data_dir=tmp_path,
                                    val_split=10, eval_batch_size=4)  # fmt: skip
    assert (dm.num_classes, dm.image_shape, dm.mean) == (10, (3, 32, 32), CIFAR10DataModule.mean)
    dm.setup()
    assert dm.test_set_names == ["clean", "fog_s3", "fog_s1", "gaussian_noise_s3", "gaussian_noise_s1"]
    assert len(dm.train_dataset) == 40 and len(dm.test_datasets["clean"]) == 10
    for name in dm.test_set_names[1:]:
        corruption, s = name.rsplit("_s", 1)
        s, j = int(s), fake.corruptions.index(corruption)
        images, labels = next(iter(dm._loader(dm.test_datasets[name], train=False)))
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
        assert np.all(raw(images[1], dm) == pixel(j, s))
        assert labels.tolist() == fake.labels[(s - 1) * 4 : s * 4].tolist()
    assert len(dm.test_dataloader()) == 5


def test_cifar100_c(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path)
    use_fake_md5(monkeypatch, CIFAR100, tmp_path)
    write_fake_cifar_c(tmp_path, "cifar100", ["saturate"], n=2)
    dm = CIFARCorruptionsDataModule("cifar100", ["saturate"], [5], data_dir=tmp_path, val_split=0.1)
    assert (dm.num_classes, dm.std) == (100, CIFAR100DataModule.std)
    dm.setup("test")
    assert dm.test_set_names == ["clean", "saturate_s5"]
    assert np.all(raw(dm.test_datasets["saturate_s5"][0][0], dm) == pixel(0, 5))


def test_corruptions_default_to_all_19_and_missing_file_fails_at_fit(cifar10, tmp_path):
    write_fake_cifar_c(tmp_path, "cifar10", ["gaussian_noise"])
    dm = CIFARCorruptionsDataModule(data_dir=tmp_path)
    assert len(dm.corruptions) == 19
    assert dm.corruptions[-4:] == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    with pytest.raises(DataError, match=r"not found at '.*CIFAR-10-C[/\\]shot_noise.npy'. Download CIFAR-10-C.tar"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "fog.npy").write_bytes((f / "fog.npy").read_bytes()[:3000]), "fog.npy' is corrupt"),
        (lambda f: (f / "fog.npy").write_bytes(b"not an npy file at all"), r"fog.npy' is corrupt or truncated"),
        (lambda f: np.save(f / "fog.npy", np.zeros((20, 32, 32, 3), np.float32)), r"holds float32 \(20, 32, 32, 3\)"),
        (lambda f: np.save(f / "labels.npy", np.zeros(7, np.uint8)), "5 equal severity blocks"),
        (lambda f: np.save(f / "labels.npy", np.full(20, 10, np.uint8)), r"labels outside 0..9"),
    ],
)  # fmt: skip
def test_corruption_bad_files(cifar10, tmp_path, damage, message):
    damage(write_fake_cifar_c(tmp_path, "cifar10", ["fog"]).folder)
    with pytest.raises(DataError, match=message) as e:
        CIFARCorruptionsDataModule(corruptions=["fog"], data_dir=tmp_path).setup("test")
    assert "zenodo.org/records/2535967" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"corruptions": ["fogg"]}, r"unknown: \['fogg'\]"),
        ({"corruptions": []}, "data.init_args.corruptions"),
        ({"severities": [0, 1]}, "data.init_args.severities"),
        ({"severities": [2, 2]}, "data.init_args.severities"),
        ({"variant": "cifar1000"}, "data.init_args.variant"),
    ],
)
def test_corruption_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFARCorruptionsDataModule(**kwargs)


# -- every data module takes the base arguments (forwarded with **kwargs) ------------------------------
ALL = [CIFAR10DataModule, CIFAR100DataModule, CIFARCorruptionsDataModule, DigitsDataModule, ImageNet32DataModule,
       TinyImageNetDataModule]  # fmt: skip
BASE = [n for n in inspect.signature(ImageDataModule.__init__).parameters if n != "self"]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_cli_lists_every_base_argument_with_its_description(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    helps = {a.dest: a.help for a in parser._actions}
    assert set(BASE) == {"data_dir", "batch_size", "eval_batch_size", "val_split", "augment", "num_workers",
                         "pin_memory", "persistent_workers", "seed", "mean", "std", "on_device"}  # fmt: skip
    for name in BASE:
        assert helps.get(f"data.{name}"), f"{cls.__name__}: --data.{name} missing or without a description"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_config_sets_every_base_argument_through_the_subclass(cls):
    """Old private module paths keep working as class paths; a one-value mean/std covers every channel."""
    given = {"data_dir": "some/dir", "batch_size": 7, "eval_batch_size": 9, "val_split": 3, "augment": False,
             "num_workers": 1, "pin_memory": True, "persistent_workers": True, "seed": 5, "mean": [0.25],
             "std": [0.5, 0.125, 2.0]}  # fmt: skip
    if cls is DigitsDataModule:
        given["std"] = [0.5] * 3
    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageDataModule, "data")
    config = parser.parse_object({"data": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": given}})
    dm = parser.instantiate(config).data
    assert type(dm) is cls
    for module in [dm, dm.clean] if cls is CIFARCorruptionsDataModule else [dm]:
        assert module.data_dir == Path("some/dir")
        got = [getattr(module, n) for n in ("batch_size", "eval_batch_size", "val_split", "augment", "num_workers",
                                            "pin_memory", "persistent_workers", "seed", "mean", "std")]  # fmt: skip
        assert got == [7, 9, 3, False, 1, True, True, 5, (0.25,) * 3, tuple(given["std"])]


def test_digits_defaults_and_statistics_per_channel():
    grey, rgb = DigitsDataModule(channels=1), DigitsDataModule()
    assert (grey.batch_size, grey.eval_batch_size, grey.val_split, grey.augment) == (64, 256, 180, True)
    assert (grey.mean, grey.std, rgb.mean, rgb.std) == ((0.3052,), (0.3236,), (0.3052,) * 3, (0.3236,) * 3)
    assert DigitsDataModule(channels=1, mean=[0.5], std=[0.25]).std == (0.25,)
    grey._load()
    x = grey._images.double() / 255  # the data set's own statistics (all 1797 images at 32 px)
    assert abs(x.mean().item() - 0.3052) < 1e-4 and abs(x.std(unbiased=False).item() - 0.3236) < 1e-4


def test_corruptions_statistics_follow_the_variant_or_the_override():
    assert CIFARCorruptionsDataModule("cifar100").mean == CIFAR100DataModule.mean
    dm = CIFARCorruptionsDataModule(mean=(0.5, 0.5, 0.5), std=(0.25,))
    assert (dm.mean, dm.std, dm.clean.mean, dm.clean.std) == ((0.5,) * 3, (0.25,) * 3, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CIFAR10DataModule(mean=(0.5, 0.5)), r"mean = \(0.5, 0.5\): expected .* or 3 \(one per channel\)"),
        (lambda: CIFAR10DataModule(std=(0.5,) * 4), r"data.init_args.std = \(0.5, 0.5, 0.5, 0.5\)"),
        (lambda: CIFAR10DataModule(std=(0.5, -0.5, 0.5)), r"data.init_args.std = .*> 0 per channel"),
        (lambda: CIFAR10DataModule(std=()), r"data.init_args.std = \(\)"),
        (lambda: DigitsDataModule(channels=1, mean=(0.5,) * 3), r"mean = .* or 1 value for 1-channel images"),
        (lambda: DigitsDataModule(std=[0.0]), r"data.init_args.std = \[0.0\]: expected > 0 per channel"),
    ],
)
def test_statistics_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_positional_data_dir_is_refused_where_it_was_the_first_argument():
    for cls in (CIFAR10DataModule, TinyImageNetDataModule, ImageNet32DataModule):
        with pytest.raises(TypeError):
            cls("data")

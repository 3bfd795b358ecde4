"""On-device data (``data.init_args.on_device``, issue 14 item 1), on the CPU as the device.

The crop-and-flip gather against torchvision's per-image transforms, the distribution of crop offsets
and flips read back from the loader's own batches, bit-identity with the DataLoader path wherever
nothing is random, shards for 1, 2 and 3 processes, reproducibility and resume, and a short fit.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from fakes import (
    cifar_md5_attrs,
    write_fake_cifar10,
    write_fake_cifar_c,
    write_fake_imagenet32,
    write_fake_tiny_imagenet,
)
from manynets.datamodules import (
    CIFAR10DataModule,
    CIFARCorruptionsDataModule,
    DigitsDataModule,
    ImageNet32DataModule,
    TinyImageNetDataModule,
)
from manynets.datamodules.on_device import DeviceLoader, crop_and_flip, in_memory
from manynets.datamodules.resumable import EpochSampler
from manynets.datamodules.tiny_imagenet import ImageFiles
from manynets.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # small gathers and convs: faster without OpenMP contention


def fake_trainer(world: int = 1, rank: int = 0, fn: str = "fit") -> SimpleNamespace:
    """What the data module reads of a trainer: processes, rank, device, stage."""
    return SimpleNamespace(world_size=world, global_rank=rank, strategy=SimpleNamespace(root_device=CPU),
                           state=SimpleNamespace(fn=fn))  # fmt: skip


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    """The digits on the device (the CPU), set up for fit; tests set ``trainer`` and ``batch_size`` as they need."""
    dm = DigitsDataModule(on_device=True)
    dm.setup("fit")
    return dm


# -- the gather ------------------------------------------------------------------------------------------------


def test_crop_and_flip_is_torchvision_pad_crop_flip_per_image():
    images = torch.randint(1, 256, (5, 3, 6, 9), dtype=torch.uint8)  # non-square: rows and columns not mixed up
    rows = torch.tensor([4, 0, 0, 2, 3, 1, 4])
    p = 3
    tops, lefts = torch.tensor([0, 6, 3, 1, 5, 2, 6]), torch.tensor([6, 0, 3, 4, 1, 5, 0])
    flips = torch.tensor([True, False, True, False, True, True, False])
    got = crop_and_flip(images, rows, tops, lefts, flips, p)
    for b in range(len(rows)):
        padded = v2.functional.pad(images[rows[b]], [p])
        expected = v2.functional.crop(padded, int(tops[b]), int(lefts[b]), 6, 9)
        if flips[b]:
            expected = v2.functional.horizontal_flip(expected)
        assert torch.equal(got[b], expected), b


def coordinate_images(n: int, side: int) -> torch.Tensor:
    """n identical one-channel images whose pixel (y, x) holds y * side + x + 1 (0 is the padding)."""
    grid = torch.arange(side * side, dtype=torch.int64).reshape(side, side) + 1
    return grid.to(torch.uint8).expand(n, 1, side, side).contiguous()


def test_crop_offsets_are_uniform_over_0_to_2p_and_flips_fair():
    """Offsets and flips read back from the loader's batches: the centre pixel of each crop names the source
    pixel (top + c - p, left + c' - p), its right neighbour says whether the image was flipped."""
    n, side, p, epochs = 3000, 15, 4, 3
    images = coordinate_images(n, side)
    sampler = EpochSampler(range(n), seed=3)
    loader = DeviceLoader(images, torch.zeros(n, dtype=torch.int64), None, sampler, 1000, lambda x: x,
                          augment=True, padding=p, flip=True, seed=3)  # fmt: skip
    tops, lefts, flips = [], [], []
    c = side // 2
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, _ in loader:
            centre, right = x[:, 0, c, c].long() - 1, x[:, 0, c, c + 1].long() - 1
            flipped = right - centre == -1
            assert bool(((right - centre == 1) | flipped).all())
            tops.append(centre // side - c + p)
            lefts.append(centre % side - torch.where(flipped, side - 1 - c, c) + p)  # flipped: column W-1-c
            flips.append(flipped)
    tops, lefts, flips = torch.cat(tops), torch.cat(lefts), torch.cat(flips)
    draws = n * epochs
    # chi-square over the 9 offsets (8 degrees of freedom): P(X > 26.1) = 0.001 when uniform
    for offsets in (tops, lefts):
        counts = torch.bincount(offsets, minlength=2 * p + 1).double()
        assert len(counts) == 2 * p + 1  # nothing outside 0..2p
        expected = draws / (2 * p + 1)
        assert float(((counts - expected) ** 2 / expected).sum()) < 26.1, counts.tolist()
    joint = torch.bincount(tops * (2 * p + 1) + lefts, minlength=(2 * p + 1) ** 2).double()  # independent: 81 cells
    expected = draws / (2 * p + 1) ** 2
    assert float(((joint - expected) ** 2 / expected).sum()) < 124.8  # 80 dof, p = 0.001
    assert abs(flips.double().mean().item() - 0.5) < 4 * 0.5 / draws**0.5
    pairs = torch.bincount(flips.long() * (2 * p + 1) + lefts, minlength=2 * (2 * p + 1)).double()  # independent
    expected = draws / (2 * (2 * p + 1))
    assert float(((pairs - expected) ** 2 / expected).sum()) < 40.8  # 17 dof, p = 0.001


def test_digits_have_no_flip(digits):
    digits.trainer = None
    loader = digits.train_dataloader()
    assert loader.augment and not loader.flip and loader.padding == 4


# -- bit-identical to the DataLoader path without augmentation ---------------------------------------------------


def _fake_cifar(root: Path, monkeypatch) -> None:
    write_fake_cifar10(root, n_train=40, n_test=12)
    for name, value in cifar_md5_attrs(CIFAR10, root).items():
        monkeypatch.setattr(CIFAR10, name, value)


def _cifar(root: Path, **kwargs):
    return CIFAR10DataModule(data_dir=root, val_split=8, batch_size=16, eval_batch_size=5, **kwargs)


# name: (write the fake files into root, data module on root)
MODULES = {
    "digits": (lambda root, mp: None, lambda root, **kw: DigitsDataModule(batch_size=100, eval_batch_size=70, **kw)),
    "cifar10": (_fake_cifar, _cifar),
    "cifar10_resolution40": (_fake_cifar, lambda root, **kw: _cifar(root, resolution=40, **kw)),
    "cifar10c": (
        lambda root, mp: (_fake_cifar(root, mp), write_fake_cifar_c(root, corruptions=("gaussian_noise", "fog"), n=4)),
        lambda root, **kw: CIFARCorruptionsDataModule(data_dir=root, val_split=8, batch_size=16, eval_batch_size=3,
                                                      corruptions=["gaussian_noise", "fog"], severities=[1, 5], **kw),
    ),
    "imagenet32": (
        lambda root, mp: write_fake_imagenet32(root, n_per_batch=4, n_val=9),
        lambda root, **kw: ImageNet32DataModule(data_dir=root, val_split=0.25, batch_size=8, eval_batch_size=4, **kw),
    ),
    "tiny_imagenet": (
        lambda root, mp: write_fake_tiny_imagenet(root, n_per_class=4, n_val=5),
        lambda root, **kw: TinyImageNetDataModule(data_dir=root, val_split=3, batch_size=4, eval_batch_size=2, **kw),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODULES))
def test_without_augmentation_batches_equal_the_dataloader_path(name, tmp_path, monkeypatch):
    """Training with augment off, validation, every test set and predict: same images (bit for bit), labels
    and batches, in the same order."""
    write, build = MODULES[name]
    write(tmp_path, monkeypatch)
    cpu, device = build(tmp_path, augment=False), build(tmp_path, augment=False, on_device=True)
    for dm in (cpu, device):
        dm.trainer = fake_trainer()
        dm.setup("fit")
        dm.setup("test")
    listed = lambda loaders: loaders if isinstance(loaders, list) else [loaders]  # noqa: E731
    pairs = [(cpu.train_dataloader(), device.train_dataloader()), (cpu.val_dataloader(), device.val_dataloader())]
    pairs += list(zip(listed(cpu.test_dataloader()), listed(device.test_dataloader())))
    pairs += list(zip(listed(cpu.predict_dataloader()), listed(device.predict_dataloader())))
    if name == "cifar10c":
        assert len(pairs) == 2 + 2 * (1 + 2 * 2)  # clean + 2 corruptions x 2 severities, for test and predict
    for expected_loader, loader in pairs:
        assert isinstance(loader, DeviceLoader)
        expected, got = batches(expected_loader), batches(loader)
        assert len(got) == len(expected) == len(loader) > 0
        for (x0, y0), (x1, y1) in zip(expected, got):
            assert x1.dtype == torch.float32 and y1.dtype == torch.int64 and x1.is_contiguous()
            assert x1.shape[1:] == device.image_shape
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_augmented_training_batches_keep_order_labels_and_statistics(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, monkeypatch)
    cpu, device = _cifar(tmp_path), _cifar(tmp_path, on_device=True)
    for dm in (cpu, device):
        dm.setup("fit")
    expected, got = batches(cpu.train_dataloader()), batches(device.train_dataloader())
    assert [y.tolist() for _, y in expected] == [y.tolist() for _, y in got]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(expected, got))  # other draws, same distribution


def test_a_data_set_without_images_in_memory_is_refused():
    files = ImageFiles([Path("a.JPEG")], [0], (64, 64))
    with pytest.raises(ConfigError, match="data.init_args.on_device"):
        in_memory(files)
    assert TinyImageNetDataModule(on_device=True).in_memory


# -- shards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_set(world, digits):
    """Rank r takes positions r, r + R, ... of the single-process order (padded to a multiple of R with its
    first images, as DistributedSampler): together every image once, plus the padding; an image looks the
    same whichever process draws it."""

    def shards(stage: str, world: int):
        out = []
        for rank in range(world):
            digits.batch_size, digits.eval_batch_size = 2000, 50  # one training batch: none dropped
            digits.trainer = fake_trainer(world, rank)
            loader = digits.train_dataloader() if stage == "train" else digits.val_dataloader()
            loader.labels = torch.arange(len(loader.images))  # labels name the rows
            out.append(batches(loader))
        return out

    for stage in ("train", "val"):
        (single,) = shards(stage, 1)
        order = torch.cat([y for _, y in single])
        images = dict(zip(order.tolist(), torch.cat([x for x, _ in single])))
        n = len(order)
        assert len(set(order.tolist())) == n
        padded = torch.cat([order, order[: -n % world]])
        got = shards(stage, world)
        for rank, shard in enumerate(got):
            ids = torch.cat([y for _, y in shard])
            assert torch.equal(ids, padded[rank::world]), (stage, rank)
            for x, y in shard:
                assert all(torch.equal(x[k], images[int(y[k])]) for k in range(0, len(y), 97))
        union = torch.cat([y for shard in got for _, y in shard])
        assert set(union.tolist()) == set(order.tolist()) and len(union) == n + (-n % world)


# -- reproducible, resumable -------------------------------------------------------------------------------------


def test_same_seed_and_epoch_give_the_same_batches_other_epochs_and_seeds_do_not(monkeypatch, digits):
    digits.trainer, digits.batch_size = None, 64

    def loader(seed: int, epoch: int = 0):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        out = digits.train_dataloader()
        out.sampler.set_epoch(epoch)
        return out

    state = torch.get_rng_state()
    first = batches(loader(7))
    assert torch.equal(state, torch.get_rng_state())  # the global generator plays no part
    torch.manual_seed(123)
    again = batches(loader(7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    for other in (loader(7, epoch=1), loader(8)):
        x, y = next(iter(other))
        assert not torch.equal(y, first[0][1]) and not torch.equal(x, first[0][0])


def test_a_resumed_epoch_continues_with_the_same_batches(digits):
    digits.trainer, digits.batch_size = None, 32
    full = digits.train_dataloader()
    full.sampler.set_epoch(2)
    full = batches(full)
    resumed = digits.train_dataloader()
    resumed.load_state_dict({"epoch": 2, "batches": 5, "batch_size": 32})
    rest = batches(resumed)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], rest))
    assert resumed.state_dict() == {"epoch": 2, "batches": len(full), "batch_size": 32}


# -- a short fit ------------------------------------------------------------------------------------------------


def test_digits_quickstart_fits_on_device_with_the_weights_of_the_dataloader_path(tmp_path):
    """Augmentation off, deterministic: the same batches, so the same weights after a step and a validation."""
    from manynets.cli import main

    weights = {}
    for on_device in (False, True):
        root = tmp_path / str(on_device)
        main(["fit", "--config", str(REPO / "configs" / "quickstart" / "digits.yaml"),
              "--model.init_args.backbone.init_args.depth=10", "--model.init_args.backbone.init_args.width=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
              "--trainer.num_sanity_val_steps=0", "--trainer.deterministic=true", f"--trainer.default_root_dir={root}",
              "--data.init_args.batch_size=32", "--data.init_args.eval_batch_size=32", "--data.init_args.augment=false",
              f"--data.init_args.on_device={str(on_device).lower()}"])  # fmt: skip
        ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert ckpt["global_step"] == 1
        weights[on_device] = ckpt["state_dict"]
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():
        assert torch.equal(value, weights[True][key]), key

"""The one data contract every method relies on (see ARCHITECTURE.md, "Data").

A data module yields ``(images, labels)``: float images normalised with the data
set's ``mean``/``std`` and int64 labels. It exposes ``num_classes``,
``image_shape`` (C, H, W), ``mean`` and ``std``. Method-specific batch formatting
happens inside the LightningModule, so nothing here knows about methods.

Subclasses implement :meth:`train_set` and :meth:`test_sets`, each taking the
transform to apply; the base class does the seeded train/val split, the standard
augmentation (random crop with padding 4, horizontal flip) and the loaders. The training loader is
resumable: its order and augmentation depend only on (training seed, epoch, image) and its position is
saved in checkpoints (:mod:`manynets.datamodules.resumable`), so a killed run resumes exactly. With
``on_device`` every split lives as one uint8 tensor on the training device and batches are gathered,
augmented and normalised there (:mod:`manynets.datamodules.on_device`), in the same order.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from manynets.datamodules.on_device import DeviceLoader, in_memory
from manynets.datamodules.resumable import EpochSampler, ResumableLoader, SeededItems
from manynets.errors import DataError, check_arg


class ImageDataModule(pl.LightningDataModule):
    """Base class: seeded train/val split, standard augmentation and loaders.

    Subclasses take their own arguments and hand the ones below on with ``**kwargs`` (so the CLI lists
    these, with these descriptions, for every data module), and set the class attributes ``num_classes``,
    ``image_shape`` and the data set's per-channel statistics ``mean``/``std`` (a one-value tuple applies
    to every channel); a subclass whose shape or statistics depend on its arguments sets them on the
    instance before calling this constructor.

    Args:
        data_dir: root folder of the data set files.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size for validation and test (default: ``batch_size``).
        val_split: number (int >= 1) or fraction (0 < x < 1) of training samples held out
            for validation, drawn with ``seed``; ``0`` validates on the test set (warns).
        augment: random crop (padding 4), plus a horizontal flip where the data set allows it, on the
            training split.
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: DataLoader ``pin_memory`` (page-locked batches for faster copies to a GPU).
        persistent_workers: keep the DataLoader workers alive between epochs (only with ``num_workers`` > 0).
        seed: seed of the train/val split (independent of the training seed).
        mean: per-channel normalisation mean (one value: the same for every channel); ``None`` uses
            the data set's statistics (MixMo and the subspaces paper use other values; their configs set them).
        std: per-channel normalisation standard deviation, > 0 (one value: the same for every channel);
            ``None`` uses the data set's statistics.
        on_device: keep each split as one uint8 tensor on the training device and crop, flip and normalise
            whole batches there (no worker processes; ``num_workers``, ``pin_memory`` and
            ``persistent_workers`` are unused). Same order, shards and resume as the DataLoader path, and
            the same images without augmentation; crops and flips are drawn per (training seed, epoch, image)
            from their own generator. Each process holds the whole data set.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    horizontal_flip: bool = True

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_split: int | float = 5000,
        augment: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        seed: int = 42,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        d = "data.init_args."
        check_arg(batch_size >= 1, d + "batch_size", batch_size, ">= 1")
        check_arg(eval_batch_size is None or eval_batch_size >= 1, d + "eval_batch_size", eval_batch_size,
                  "null (= batch_size) or >= 1")
        check_arg(val_split >= 0 and (isinstance(val_split, int) or val_split < 1), d + "val_split", val_split,
                  "a count >= 0 or a fraction in [0, 1)", "Hold out 5000 images or 0.1 of them; 0 validates on test.")
        check_arg(num_workers >= 0, d + "num_workers", num_workers, ">= 0", "0 loads in the main process.")
        channels = self.image_shape[0]
        sizes = f"1 value (for every channel) or {channels} (one per channel)" if channels > 1 else "1 value"
        for key, value in (("mean", mean), ("std", std)):
            check_arg(value is None or len(value) in (1, channels), d + key, value,
                      f"null (the data set's statistics) or {sizes} for {channels}-channel images")
        check_arg(std is None or min(std) > 0, d + "std", std, "> 0 per channel (or null)")
        self.mean = self._per_channel(self.mean if mean is None else mean)  # instance value over class default
        self.std = self._per_channel(self.std if std is None else std)
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_split = val_split
        self.augment = augment
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.on_device = on_device
        self._device_images: dict[tuple, torch.Tensor] = {}  # uint8 images moved to a device, by source and device
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_datasets: dict[str, Dataset] = {}
        self._train_position: dict | None = None  # restored from a checkpoint, applied to the next train loader

    def _per_channel(self, values) -> tuple[float, ...]:
        """``values`` as a tuple with one float per image channel (a single value is repeated)."""
        values = tuple(float(v) for v in values)
        return values * self.image_shape[0] if len(values) == 1 else values

    # -- to implement --------------------------------------------------------------
    def train_set(self, transform: Callable) -> Dataset:
        """The full official training set with ``transform`` applied to each image."""
        raise NotImplementedError

    def test_sets(self, transform: Callable) -> Mapping[str, Dataset]:
        """Named test sets (``{"test": ...}`` for a single one) with ``transform`` applied."""
        raise NotImplementedError

    # -- transforms ----------------------------------------------------------------
    def eval_transform(self) -> Callable:
        """uint8 (C, H, W) tensor or PIL image -> normalised float tensor."""
        return v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        )

    def batch_transform(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 (B, C, H, W) batch on ``device`` -> what :meth:`eval_transform` makes of each image, bit for bit
        (the ``on_device`` path). The statistics are put on the device once, not copied there per batch."""
        mean, std = (torch.tensor(v, dtype=torch.float32, device=device) for v in (self.mean, self.std))
        return lambda x: v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), mean, std)

    def train_transform(self) -> Callable:
        """Standard augmentation (random crop with padding, horizontal flip), then normalisation."""
        if not self.augment:
            return self.eval_transform()
        size = self.image_shape[1:]
        ops: list = [v2.ToImage(), v2.RandomCrop(size, padding=self.crop_padding)]
        if self.horizontal_flip:
            ops.append(v2.RandomHorizontalFlip())
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(ops)

    # -- Lightning hooks -----------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_dataset is None:
            train_aug = self.train_set(self.train_transform())
            n = len(train_aug)
            n_val = self._num_val(n)
            if n_val == 0:
                warnings.warn(
                    f"{type(self).__name__}: val_split=0, so validation runs on the test set; "
                    "do not select models or hyper-parameters on these numbers.",
                    stacklevel=2,
                )
                self.train_dataset = train_aug
                self.val_dataset = next(iter(self.test_sets(self.eval_transform()).values()))
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed), device="cpu").tolist()
                train_plain = self.train_set(self.eval_transform())
                self.train_dataset = Subset(train_aug, perm[n_val:])
                self.val_dataset = Subset(train_plain, perm[:n_val])
        if stage in ("test", "predict", None) and not self.test_datasets:
            self.test_datasets = dict(self.test_sets(self.eval_transform()))

    def _num_val(self, n: int) -> int:
        n_val = round(self.val_split * n) if isinstance(self.val_split, float) else int(self.val_split)
        if n_val >= n:
            raise ValueError(
                f"data.val_split={self.val_split} holds out {n_val} of only {n} training samples; "
                "use a smaller number or a fraction such as 0.1."
            )
        return n_val

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader | DeviceLoader:
        """An evaluation loader (in order); ``train=True`` gives :meth:`train_dataloader`'s loader.

        Every loader owns a ``torch.Generator`` (for its workers' base seeds), so iterating a loader
        never draws from the global generator that the training step uses. With ``on_device`` an
        evaluation loader shards itself over the processes as Lightning shards a DataLoader's
        (``DistributedSampler`` without shuffling: the last shard padded with the first images).
        """
        if train:
            return self._train_loader(dataset)
        if self.on_device:
            world, rank = self._world()
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
            images, labels, rows = self._on_device(dataset)
            transform = self.batch_transform(images.device)
            return DeviceLoader(images, labels, rows, sampler, self.eval_batch_size, transform)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _world(self) -> tuple[int, int]:
        """(number of processes, this process's rank) of the trainer; (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _on_device(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(images, labels, rows)`` of ``dataset`` (see :func:`~manynets.datamodules.on_device.in_memory`)
        with images and labels on the trainer's device (the CPU without a trainer). Images move once per
        source tensor and device (on the CPU they stay where they are: no copy of a memory-mapped file), so a
        training split and its held-out validation rows share one copy."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        images, labels, rows = in_memory(dataset)
        key = (images.data_ptr(), tuple(images.shape), tuple(images.stride()), str(device))
        if key not in self._device_images:
            moved = images.device != device
            self._device_images[key] = images.to(device, memory_format=torch.contiguous_format) if moved else images
        return self._device_images[key], labels.to(device), rows

    def _train_loader(self, dataset: Dataset) -> ResumableLoader | DeviceLoader:
        """Shuffled by (training seed, epoch), sharded over the trainer's processes, augmentation seeded per
        (training seed, epoch, image), position saved in checkpoints: see :mod:`manynets.datamodules.resumable`."""
        trainer = self.trainer
        world, rank = self._world()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, seed=seed)
        progress = None
        if trainer is not None:
            progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed  # noqa: E731
        drop_last = sampler.num_samples > self.batch_size
        if self.on_device:
            images, labels, rows = self._on_device(dataset)
            loader = DeviceLoader(
                images, labels, rows, sampler, self.batch_size, self.batch_transform(images.device),
                augment=self.augment, padding=self.crop_padding, flip=self.horizontal_flip, seed=seed,
                drop_last=drop_last, progress=progress,
            )  # fmt: skip
        else:
            loader = ResumableLoader(
                SeededItems(dataset, seed),
                batch_size=self.batch_size,
                sampler=sampler,
                drop_last=drop_last,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.persistent_workers,
                generator=torch.Generator().manual_seed(seed),
                progress=progress,
            )
        fitting = trainer is not None and trainer.state.fn == "fit"
        if self._train_position is not None and fitting:
            # only a resumed fit continues mid-epoch; test/validate passes over the training data (BN recompute,
            # sweeps, probes) see the whole set
            loader.load_state_dict(self._train_position)
            self._train_position = None
        self._last_train_loader = loader
        return loader

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader(self.train_dataset, train=True)

    def state_dict(self) -> dict:
        """The training loader's position (epoch, batches trained on), saved in every checkpoint.

        Lightning also saves it as the loader's own state, but restores that only when its first
        ``setup_data`` comes after the loop state is loaded, which ``estimated_stepping_batches``
        (OneCycleLR's length) breaks; the data module's state is restored before any loader is built.
        """
        loader = getattr(self, "_last_train_loader", None)
        return {"train_position": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_position = state_dict.get("train_position")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(d, train=False) for d in self.test_datasets.values()]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()

    @property
    def test_set_names(self) -> Sequence[str]:
        """Names of the test loaders, in order; metric names are prefixed with them when there are several."""
        return list(self.test_datasets)


class UInt8ImageDataset(Dataset):
    """Images as one uint8 (N, C, H, W) tensor plus int64 labels; ``transform`` applies per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


def require_path(path: Path, what: str, how_to_get: str) -> Path:
    """Raise :class:`DataError` naming ``path`` and how to obtain it, unless it exists."""
    if not path.exists():
        raise DataError(f"{what} not found at '{path}'. {how_to_get}")
    return path

"""On-device data (``data.init_args.on_device``): a whole split as one uint8 tensor on the training device.

The GPU recipe of fast small-image training (airbench keeps the uint8 CIFAR set on the GPU and augments
there): no worker processes, no per-image Python. Each batch is

1. the rows of the epoch's order for this rank (an :class:`~manynets.datamodules.resumable.EpochSampler`,
   the very sampler of the DataLoader path: same order, same disjoint and covering shards, same resume),
2. gathered with the random crop and horizontal flip in one advanced-indexing gather
   (:func:`crop_and_flip`),
3. put through the data module's ``batch_transform`` (``uint8 -> float``, normalisation with the statistics
   kept on the device, CIFAR's optional resize): its evaluation transform, applied to the whole batch.

Crop offsets and flips are drawn per epoch for every image of the split from a CPU generator seeded with
``(seed, epoch)`` (:func:`draw_crops_and_flips`), so they depend only on (seed, epoch, image): not on the
device, the number of processes or where a run was resumed. They follow the distribution of the
DataLoader path (torchvision's ``RandomCrop(padding=p)``: both offsets uniform over 0..2p; flip with
probability 1/2), not its draws. Without augmentation a batch is bit-identical to the DataLoader path's.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from manynets.datamodules.resumable import EpochSampler, TrainingPosition, mix_seed
from manynets.errors import ConfigError


def draw_crops_and_flips(n: int, padding: int, flip: bool, seed: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(tops, lefts, flips)`` of ``n`` images for one epoch, on the CPU.

    Offsets are uniform over ``0..2 * padding`` (the crop corner in the zero-padded image, as
    ``RandomCrop(size, padding)`` draws it); ``flips`` is True with probability 1/2 (all False
    without ``flip``). Seeded with ``(seed, epoch)`` only.
    """
    g = torch.Generator(device="cpu").manual_seed(mix_seed(seed, epoch))
    tops = torch.randint(0, 2 * padding + 1, (n,), generator=g, device="cpu")
    lefts = torch.randint(0, 2 * padding + 1, (n,), generator=g, device="cpu")
    flips = torch.randint(0, 2, (n,), generator=g, device="cpu").bool() if flip else torch.zeros(n, dtype=torch.bool)
    return tops, lefts, flips


def crop_and_flip(images: Tensor, rows: Tensor, tops: Tensor, lefts: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Crop ``images[rows]`` out of their zero-padded copies, then flip the chosen ones, in one gather.

    For the image of row ``r = rows[b]`` (``images``: (N, C, H, W), any dtype and device)::

        out[b, c, i, j] = images[r, c, tops[b] + i - p, lefts[b] + j' - p],  j' = W-1-j if flips[b] else j

    and 0 where the source lies outside the image: exactly ``RandomCrop((H, W), padding=p)`` with corner
    ``(tops[b], lefts[b])`` followed by ``RandomHorizontalFlip``. Nothing is padded: the selected images are
    read with one ``gather`` of clamped pixel indices (shared by the channels) and the border is zeroed.
    """
    _, channels, height, width = images.shape
    batch, device = len(rows), images.device
    i = torch.arange(height, device=device)
    j = torch.arange(width, device=device)
    y = tops[:, None] - padding + i  # (B, H) source rows
    x = lefts[:, None] - padding + torch.where(flips[:, None], width - 1 - j, j)  # (B, W) source columns
    pixels = (y.clamp(0, height - 1)[:, :, None] * width + x.clamp(0, width - 1)[:, None, :]).view(batch, 1, -1)
    out = images[rows].reshape(batch, channels, -1).gather(2, pixels.expand(-1, channels, -1))
    outside = ((y < 0) | (y >= height))[:, :, None] | ((x < 0) | (x >= width))[:, None, :]  # (B, H, W)
    return out.view(batch, channels, height, width).masked_fill_(outside[:, None], 0)


def in_memory(dataset: Dataset, argument: str = "data.init_args.on_device") -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images uint8 (N, C, H, W), labels int64 (N,), rows)`` behind a data set, without its transform.

    ``rows`` (int64, or ``None`` for all) are the rows of ``images`` that make up ``dataset``: a held-out
    split is a ``Subset`` of the full training set and shares its images. Knows the data sets of the data
    modules: ``UInt8ImageDataset`` (``images``/``labels``), torchvision's CIFAR (``data`` uint8 (N, H, W, C),
    ``targets``) and ``Subset`` of either.
    """
    if isinstance(dataset, Subset):
        images, labels, rows = in_memory(dataset.dataset, argument)
        indices = torch.as_tensor(dataset.indices, dtype=torch.int64, device="cpu")
        return images, labels, indices if rows is None else rows[indices]
    if isinstance(getattr(dataset, "images", None), Tensor) and isinstance(getattr(dataset, "labels", None), Tensor):
        return dataset.images, dataset.labels, None
    data = getattr(dataset, "data", None)
    if getattr(data, "dtype", None) is not None and str(data.dtype) == "uint8" and getattr(data, "ndim", 0) == 4:
        images = torch.from_numpy(data).permute(0, 3, 1, 2)  # a view, (N, C, H, W)
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64, device="cpu"), None
    raise ConfigError(
        f"{argument} = True: a {type(dataset).__name__} keeps no uint8 image tensor in memory; "
        "set it to false for this data module (or load its images into memory)."
    )


class DeviceLoader(TrainingPosition):
    """Batches ``(normalised float images, int64 labels)`` made on the device that holds ``images``.

    Args:
        images: uint8 (N, C, H, W) on the training device.
        labels: int64 (N,) on the same device.
        rows: rows of ``images`` that form the split (CPU int64; ``None``: every row), indexed by the
            sampler's positions.
        sampler: an :class:`EpochSampler` over the split: the order (shuffled or not), the rank's shard and
            the epoch; a resume skip set on it (``load_state_dict``) is honoured.
        batch_size: images per batch.
        transform: uint8 batch -> float batch on the device (the data module's ``batch_transform``).
        augment: random crop (zero padding ``padding``) and, with ``flip``, horizontal flip.
        padding: zero padding of the random crop.
        flip: flip horizontally with probability 1/2 (with ``augment``).
        seed: training seed of the crop and flip draws (they depend on (seed, epoch, image) only).
        drop_last: drop the last incomplete batch.
        progress: returns the number of batches of the current epoch already trained on (the trainer's
            batch progress); without it, the batches this loader has handed out.
    """

    batch_sampler = None  # batches are consecutive slices of the sampler's order (Lightning looks for this)

    def __init__(self, images: Tensor, labels: Tensor, rows: Tensor | None, sampler: EpochSampler, batch_size: int,
                 transform: Callable[[Tensor], Tensor], augment: bool = False, padding: int = 0, flip: bool = False,
                 seed: int = 0, drop_last: bool = False,
                 progress: Callable[[], int] | None = None) -> None:  # fmt: skip
        self.images, self.labels, self.rows, self.sampler = images, labels, rows, sampler
        self.batch_size, self.transform, self.drop_last, self.progress = batch_size, transform, drop_last, progress
        self.augment, self.padding, self.flip, self.seed = augment, padding, flip, int(seed)
        self._handed_out = 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def dataset(self) -> Dataset:
        """The split the sampler draws from (its length is the number of images), as ``DataLoader.dataset``."""
        return self.sampler.dataset

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self._handed_out = self.sampler.skip // self.batch_size
        size = len(self.sampler.dataset)
        epoch = self.sampler.epoch
        positions = torch.as_tensor(list(self.sampler), dtype=torch.int64, device="cpu") - epoch * size
        rows = positions if self.rows is None else self.rows[positions]
        count = len(rows) // self.batch_size if self.drop_last else -(-len(rows) // self.batch_size)
        rows = rows.to(self.device)
        if self.augment:
            draws = draw_crops_and_flips(size, self.padding, self.flip, self.seed, epoch)
            tops, lefts, flips = (d[positions].to(self.device) for d in draws)
        for b in range(count):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if self.augment:
                x = crop_and_flip(self.images, rows[batch], tops[batch], lefts[batch], flips[batch], self.padding)
            else:
                x = self.images[rows[batch]]
            images = self.transform(x.contiguous())
            self._handed_out += 1
            yield images, self.labels[rows[batch]]

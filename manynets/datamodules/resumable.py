"""Training data whose order and augmentation are a function of (seed, epoch, image): exact resume.

Three pieces make a run killed at any step continue as if it had never stopped:

- :class:`EpochSampler`: a ``DistributedSampler`` (one replica without DDP, so Lightning keeps it and
  never re-instantiates the loader) whose permutation depends only on ``(seed, epoch)``; it yields
  ``epoch * N + i``, so the data set knows the epoch of every item, in worker processes too.
- :class:`SeededItems`: fetches item ``i`` of epoch ``e`` with the CPU random generator seeded from
  ``(seed, e, i)`` and restores the generator afterwards, so random augmentation (torchvision's
  transforms draw from the global generator) neither depends on nor disturbs anything else: not the
  number of workers, not the prefetching, not the training step's own draws.
- :class:`ResumableLoader`: a ``DataLoader`` with ``state_dict``/``load_state_dict``; Lightning saves
  the state in every checkpoint (``fit_loop.combined_loader``) and restores it when a run restarts
  mid-epoch, so the loader skips the batches already trained on (indices only: nothing is loaded); its
  position bookkeeping, :class:`TrainingPosition`, is shared with the on-device loader
  (:mod:`manynets.datamodules.on_device`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from manynets.errors import CheckpointMismatchError

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio), a splitmix64-style mixer
_MASK = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser per value): distinct inputs, unrelated seeds."""
    h = 0
    for v in values:
        h = (h ^ (int(v) & _MASK)) * _MIX & _MASK
        h ^= h >> 31
        h = h * 0xBF58476D1CE4E5B9 & _MASK
        h ^= h >> 29
    return h >> 1


class EpochSampler(DistributedSampler):
    """Shuffles with a permutation of ``(seed, epoch)`` only, shards it like ``DistributedSampler``
    (rank r takes positions r, r + R, ...; the set padded to a multiple of R), skips ``skip`` leading
    positions once (a resumed epoch), and yields ``epoch * len(dataset) + index``.

    ``shuffle=False`` keeps the data set's order: Lightning's sharding of evaluation loaders under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """A skip belongs to the epoch it was loaded for: moving to another epoch drops it."""
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        offset = self.epoch * len(self.dataset)
        return iter([offset + int(i) for i in list(super().__iter__())[skip:]])


class SeededItems(Dataset):
    """``dataset`` read through :class:`EpochSampler` codes; item i of epoch e drawn under seed (seed, e, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int) -> Any:
        epoch, index = divmod(int(code), len(self.dataset))
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class TrainingPosition:
    """``state_dict``/``load_state_dict`` of a loader over an :class:`EpochSampler`: how far into its epoch
    training got. Lightning saves the state in every checkpoint (``fit_loop.combined_loader``) and restores it
    when a run restarts mid-epoch; the sampler then skips the batches already trained on.

    The loader sets ``sampler``, ``batch_size``, ``progress`` (the trainer's batch count, or ``None``) and
    counts the batches it hands out in ``_handed_out``.
    """

    sampler: EpochSampler
    batch_size: int
    progress: Callable[[], int] | None
    _handed_out: int

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else self._handed_out
        return {"epoch": int(self.sampler.epoch), "batches": int(done), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("batch_size") != self.batch_size:
            raise CheckpointMismatchError(
                f"The checkpoint's training loader had batch_size {state.get('batch_size')}, this run has "
                f"{self.batch_size}: resume with the data.init_args.batch_size the run was started with."
            )
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.skip = int(state["batches"]) * self.batch_size  # dropped if training moves to the next epoch


class ResumableLoader(TrainingPosition, DataLoader):
    """A DataLoader over an :class:`EpochSampler` that remembers how far into its epoch training got.

    Takes the arguments of ``torch.utils.data.DataLoader`` (its ``sampler`` must be an EpochSampler), plus:

    Args:
        progress: returns the number of batches of the current epoch already trained on (the
            trainer's batch progress); without it, the batches this loader has handed out.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableLoader needs an EpochSampler, got {type(self.sampler).__name__}.")
        self.progress = progress
        self._handed_out = 0

    def __iter__(self):
        self._handed_out = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

"""Data loading benchmark: on-device data (``data.init_args.on_device``) against the DataLoader path.

1. **Loader throughput**: images/s of one epoch of the CIFAR-10 training loader (random crop with padding
   4, horizontal flip, normalisation; ``val_split`` 0), each batch moved to the device (``pin_memory`` and
   ``non_blocking`` on CUDA) and the device synchronised at the end. The data are synthetic uint8 images
   written in the official CIFAR-10 python-pickle layout to a temporary folder and read by
   :class:`~manynets.datamodules.CIFAR10DataModule` (torchvision's md5 list is patched for these files, as
   the tests do). Variants: the DataLoader path with 0, 2 and 8 worker processes (persistent, warmed up)
   and on-device; rounds interleaved in rotating order, median per variant; ratio = images/s over the
   DataLoader with 2 workers, from the same run.
2. **Training epoch**: the digits quickstart (``configs/quickstart/digits.yaml``: WRN-10-2, batch 64,
   SGD + OneCycle) built by the ``manynets`` CLI, one epoch of training batches timed from
   ``on_train_epoch_start`` to ``on_train_epoch_end`` (no validation), DataLoader path (the config's 0
   workers) against on-device, the same number of rounds.

    python benchmarks/data_loading.py [--device cpu|cuda] [--threads 1] [--images 8192] [--batch 256]
                                      [--rounds 3] [--epoch-rounds 1] [--workers 0 2 8]
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torchvision.datasets import CIFAR10

from manynets.datamodules import CIFAR10DataModule

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_cifar10(root: Path, n_train: int, n_test: int = 1000, seed: int = 0) -> None:
    """Synthetic CIFAR-10 in the official layout (5 training pickles, test_batch, batches.meta) and
    torchvision's md5 list pointed at these files."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)

    def dump(obj, name):
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    train_list = []
    for b, n in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        data = rng.integers(0, 256, (len(n), 3072), dtype=np.uint8)
        train_list.append(dump({"data": data, "labels": rng.integers(0, 10, len(n)).tolist()}, f"data_batch_{b}"))
    test = dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_test).tolist()}, "test_batch")  # fmt: skip
    meta = dump({"label_names": [f"class{i}" for i in range(10)]}, "batches.meta")
    CIFAR10.train_list, CIFAR10.test_list = train_list, [test]
    CIFAR10.meta = {**CIFAR10.meta, "md5": meta[1]}


def loader_throughput(root: Path, args, device: torch.device) -> list[tuple[str, float, float]]:
    """(variant, median seconds per epoch, median images/s) of the CIFAR training loader."""
    trainer = pl.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    loaders = {}
    for workers in args.workers:
        dm = CIFAR10DataModule(data_dir=root, batch_size=args.batch, val_split=0, num_workers=workers,
                               pin_memory=device.type == "cuda")  # fmt: skip
        loaders[f"DataLoader, {workers} workers"] = dm
    loaders["on-device"] = CIFAR10DataModule(data_dir=root, batch_size=args.batch, val_split=0, on_device=True)
    for dm in loaders.values():
        dm.trainer = trainer  # the device (and world size 1, rank 0) the loaders read
        dm.setup("fit")
    built = {name: dm.train_dataloader() for name, dm in loaders.items()}
    epoch = {"n": 0}

    def run(loader) -> int:
        loader.sampler.set_epoch(epoch["n"])
        epoch["n"] += 1
        count = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            count += len(y)
        return count

    names = list(built)
    for name in names:  # warm-up: workers started, images moved to the device
        run(built[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    counts = {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            counts[name] = run(built[name])
            sync(device)
            times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(times[name]), counts[name] / statistics.median(times[name])) for name in names]


class EpochTimer(pl.Callback):
    """Seconds of each training epoch (first to last training batch, hooks included, no validation)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def quickstart_epoch(on_device: bool, device: torch.device, root: Path) -> tuple[float, int]:
    """(seconds, batches) of one training epoch of the digits quickstart."""
    from manynets.cli import ManynetsCLI

    config = REPO / "manynets" / "configs" / "quickstart" / "digits.yaml"
    cli = ManynetsCLI(args=["--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_val_batches=0",
                            "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
                            f"--trainer.accelerator={device.type}", "--trainer.enable_progress_bar=false",
                            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
                            f"--data.init_args.on_device={str(on_device).lower()}"], run=False)  # fmt: skip
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds[0], cli.trainer.num_training_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    parser.add_argument("--images", type=int, default=8192, help="synthetic CIFAR training images")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-rounds", type=int, default=1, help="quickstart epochs per path (0: skip)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*val_split=0.*")  # intended: the whole set is the training set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # as manynets.cli.main
    device = torch.device(args.device)
    pl.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "data", args.images)
        rows = loader_throughput(tmp / "data", args, device)
        baseline = dict((name, ips) for name, _, ips in rows).get("DataLoader, 2 workers", rows[0][2])
        print(f"\n1. CIFAR-10 training loader, one epoch: {args.images} synthetic 32x32 images, batch {args.batch}, "
              f"crop (pad 4) + flip + normalise, batches moved to {device}; main process {args.threads} thread(s), "
              f"workers 1 thread each; median of {args.rounds} interleaved rounds")  # fmt: skip
        print(f"{'variant':<24} {'s/epoch':>9} {'images/s':>10} {'vs 2 workers':>13}")
        for name, seconds, ips in rows:
            print(f"{name:<24} {seconds:>9.3f} {ips:>10.0f} {ips / baseline:>12.2f}x")

        if args.epoch_rounds:
            epochs = {False: [], True: []}
            batches = {}
            for r in range(args.epoch_rounds):
                for on_device in ((False, True) if r % 2 == 0 else (True, False)):
                    seconds, batches[on_device] = quickstart_epoch(on_device, device, tmp / f"run{r}{on_device}")
                    epochs[on_device].append(seconds)
            plain, fast = statistics.median(epochs[False]), statistics.median(epochs[True])
            print(f"\n2. Digits quickstart (WRN-10-2, batch 64), one training epoch ({batches[True]} batches, "
                  f"validation off) on {device}, {args.threads} thread(s), median of {args.epoch_rounds} round(s)")
            print(f"{'variant':<24} {'s/epoch':>9} {'vs DataLoader':>14}")
            print(f"{'DataLoader, 0 workers':<24} {plain:>9.2f} {1.0:>13.2f}x")
            print(f"{'on-device':<24} {fast:>9.2f} {plain / fast:>13.2f}x  (speed-up)")


if __name__ == "__main__":
    main()

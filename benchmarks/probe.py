"""Benchmark of the probes and saturation method (issue #7), ratios measured in one process.

1. Saturation overhead: epoch time of a torchvision-style ResNet-18 (ImageNet stem) at 32 px, batch 64,
   with and without the :class:`~manynets.callbacks.Saturation` callback tracking its 21 Conv2d/Linear layers
   (train batches; the epoch-end all-reduce + eigen-decompositions + CSV + plot included). Variants: float32
   products, every 4th batch. Official numbers for comparison (delve): 1.14x / 1.19-1.29x.
2. Probes: all-layer linear probes from one pass (:class:`~manynets.lightning_modules.ProbeModule`, ``solver``
   ``lbfgs``: features of one epoch kept in memory and fitted exactly; ``sgd``: streamed over epochs) against
   extracting the features to disk and fitting scikit-learn ``LogisticRegression(solver='saga', max_iter=100)`` per layer
   (PHD-LAB's recipe), on the same layers of a small VGG on the bundled digits; time ratio, and per method the
   largest per-layer gap in test accuracy to the converged optimum of the same objective (lbfgs on
   standardised features): saga with 100 iterations on raw features is far from converged.

    python benchmarks/probe.py --batches 24 --rounds 3 --pairs 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from manynets.analysis import SaturationTracker, extract_features, select_layers
from manynets.callbacks import Saturation
from manynets.lightning_modules import ClassifierModule, ProbeModule
from manynets.networks import VGG, ResNet

warnings.filterwarnings("ignore")


class EpochTimer(pl.Callback):
    """Wall time of the epoch's training steps and of the epoch-end work of the callbacks before it."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_step = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps = self.last_step - self.start
        self.epoch_end = time.perf_counter() - self.last_step


def epoch_time(callbacks: list, batches: int, device: str, tmp: str) -> tuple[float, float]:
    """(seconds of the training steps, seconds of the epoch-end work) of one epoch."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64 * batches, 3, 32, 32), torch.randint(0, 10, (64 * batches,)))
    module = ClassifierModule(partial(ResNet, depth=18), 10, (3, 32, 32), optimizer=partial(torch.optim.SGD, lr=0.01))
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
                         default_root_dir=tmp)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=64))
    return timer.steps, timer.epoch_end


CIFAR10_BATCHES = 704  # 45,000 training images (5,000 held out for validation) in batches of 64


def saturation_table(batches: int, rounds: int, device: str, tmp: str) -> list[tuple[str, float, float, float, float, float]]:
    """Per variant: ms per step, step ratio, epoch-end s, ratio of the measured short epoch, and of a CIFAR-10 epoch.

    The CIFAR-10 column scales the measured per-step times to 704 batches and adds the measured epoch-end
    time once (eigen-decompositions, CSV, plot: a fixed cost per epoch that a short timed epoch exaggerates).
    """
    variants = {
        "no callback": lambda: [],
        "Saturation (float64)": lambda: [Saturation(modes=["train"], dirpath=tmp)],
        "Saturation (float32 products)": lambda: [Saturation(modes=["train"], matmul_dtype="float32", dirpath=tmp)],
        "Saturation (every 4th batch)": lambda: [Saturation(modes=["train"], every_n_batches=4, dirpath=tmp)],
    }
    epoch_time([], 2, device, tmp)  # warm-up
    steps = {name: [] for name in variants}
    ends = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, median: robust to other load on the machine
        for name, make in variants.items():
            s, e = epoch_time(make(), batches, device, tmp)
            steps[name].append(s)
            ends[name].append(e)
    base_s, base_e = statistics.median(steps["no callback"]), statistics.median(ends["no callback"])
    rows = []
    for name in variants:
        s, e = statistics.median(steps[name]), statistics.median(ends[name])
        cifar = (s / batches * CIFAR10_BATCHES + e) / (base_s / batches * CIFAR10_BATCHES + base_e)
        rows.append((name, 1e3 * s / batches, s / base_s, e, (s + e) / (base_s + base_e), cifar))
    return rows


def paired_step_overhead(pairs: int, device: str) -> dict[str, float]:
    """Median over alternating step pairs of (tracked step time / untracked step time), one model.

    The Saturation hooks record only while their mode is set, so the same model and optimizer alternate
    between tracked and untracked steps: machine drift cancels within each pair.
    """
    torch.manual_seed(0)
    net = ResNet(10).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    ratios = {}
    for dtype in ("float64", "float32"):
        sat = SaturationTracker(select_layers(net), matmul_dtype=getattr(torch, dtype))

        def step(tracked: bool) -> float:
            sat.start("train" if tracked else None)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sat.flush()  # what the callback does at the batch end
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(3):
            step(True), step(False)
        pair = []
        for i in range(pairs):  # alternate the order within pairs too
            a, b = (step(True), step(False)) if i % 2 == 0 else reversed((step(False), step(True)))
            pair.append(a / b)
        ratios[dtype] = statistics.median(pair)
        sat.remove()
    return ratios


def probe_table(epochs: int, device: str, tmp: str) -> list[tuple[str, float, float, float]]:
    from manynets.datamodules.digits import DigitsDataModule
    from manynets.layers.probes import sklearn_probe_accuracies

    backbone = partial(VGG, depth=11, width_divisor=4, head="linear")
    # 1257 training images = 3 x 419: the drop_last training loader sees every image, as the references do
    dm = DigitsDataModule(size=32, channels=3, augment=False, batch_size=419, eval_batch_size=512)

    def one_pass(solver: str, n_epochs: int, lbfgs_max_iter: int = 100) -> tuple[ProbeModule, float]:
        torch.manual_seed(0)  # the same random backbone for every method
        module = ProbeModule(backbone=backbone, num_classes=10, image_shape=(3, 32, 32), C=1.0, dirpath=tmp,
                             solver=solver, lbfgs_max_iter=lbfgs_max_iter, optimizer=partial(torch.optim.Adam, lr=0.01),
                             lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=n_epochs))  # fmt: skip
        trainer = pl.Trainer(max_epochs=n_epochs, accelerator=device, devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp)  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, dm)
        trainer.test(module, dm, verbose=False)
        return module, time.perf_counter() - start

    sgd, sgd_s = one_pass("sgd", epochs)
    lbfgs, lbfgs_s = one_pass("lbfgs", 1, 500)
    lbfgs100, lbfgs100_s = one_pass("lbfgs", 1, 100)

    dm.setup("fit")
    dm.setup("test")
    layers = select_layers(lbfgs.network)
    start = time.perf_counter()
    train = extract_features(lbfgs.network, layers, dm.train_dataloader(), 4, lbfgs.device)
    test = extract_features(lbfgs.network, layers, dm.test_dataloader(), 4, lbfgs.device)
    with tempfile.TemporaryDirectory() as disk:  # PHD-LAB writes the latents to disk and reads them back
        for split, (feats, _) in (("train", train), ("test", test)):
            for name, x in feats.items():
                np.save(f"{disk}/{split}_{name}.npy", x)
                feats[name] = np.load(f"{disk}/{split}_{name}.npy")
    ref = sklearn_probe_accuracies(train, {"test": test}, C=1.0, solver="saga", max_iter=100, standardize=False)
    saga_s = time.perf_counter() - start
    # The optimum of the same objective (standardised features, C = 1): what every method should reach.
    converged = sklearn_probe_accuracies(train, {"test": test}, C=1.0, solver="lbfgs", max_iter=2000, standardize=True)

    def gap(results) -> float:  # largest per-layer |test accuracy - converged test accuracy|, in pp
        return 100 * max(abs(results[n]["test_acc"] - converged[n]["test_acc"]) for n in converged)

    def mean(results) -> float:
        return statistics.mean(results[n]["test_acc"] for n in converged)

    return [
        (f"one pass, {len(layers)} probes, lbfgs 500 it.", lbfgs_s, mean(lbfgs.results), gap(lbfgs.results)),
        (f"one pass, {len(layers)} probes, lbfgs 100 it.", lbfgs100_s, mean(lbfgs100.results), gap(lbfgs100.results)),
        (f"one pass, {len(layers)} probes, sgd ({epochs} epochs)", sgd_s, mean(sgd.results), gap(sgd.results)),
        ("extract to disk + sklearn saga (100 it.)", saga_s, mean(ref), gap(ref)),
        ("sklearn lbfgs, standardised (converged)", float("nan"), mean(converged), 0.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=24, help="training batches of 64 per timed epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=30, help="alternating tracked/untracked step pairs")
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", choices=["saturation", "probes"], default=None)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.skip != "saturation":
        n = len(select_layers(ResNet(10)))
        print(f"\nSaturation overhead: ResNet-18 (ImageNet stem) 32 px, batch 64, {n} tracked layers, "
              f"{args.batches} batches/epoch, median of {args.rounds}")  # fmt: skip
        print(f"{'variant':32s} {'ms/step':>8s} {'steps':>6s} {'end s':>6s} {'epoch':>6s} {'CIFAR-10 epoch':>15s}")
        for name, ms, step_ratio, end, short, cifar in saturation_table(args.batches, args.rounds, args.device, tmp):
            print(f"{name:32s} {ms:8.1f} {step_ratio:6.3f} {end:6.2f} {short:6.3f} {cifar:15.3f}")
        print(f"steps, epoch: ratios to no callback over the timed {args.batches}-batch epoch; CIFAR-10 epoch: "
              f"per-step times scaled to {CIFAR10_BATCHES} batches + the measured epoch end")
        paired = paired_step_overhead(args.pairs, args.device)
        print(f"tracked / untracked step, median of {args.pairs} alternating pairs on one model: "
              + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    if args.skip != "probes":
        print("\nProbes on digits, VGG-11/4, all Conv2d/Linear layers, conv maps pooled to 4x4, C = 1")
        rows = probe_table(args.probe_epochs, args.device, tmp)
        print(f"{'':44s} {'seconds':>8s} {'mean test acc':>14s} {'max |gap| to converged, pp':>28s}")
        for name, seconds, acc, gap in rows:
            print(f"{name:44s} {seconds:8.2f} {acc:14.4f} {gap:28.2f}")
        saga = rows[3][1]
        print(f"time ratio saga recipe / one pass: lbfgs {saga / rows[0][1]:.2f}, lbfgs 100 it. {saga / rows[1][1]:.2f}, "
              f"sgd {saga / rows[2][1]:.2f}")


if __name__ == "__main__":
    main()

"""Benchmark of the probes and saturation method (issue #7), ratios measured in one process.

1. Saturation overhead: epoch time of a torchvision-style ResNet-18 (ImageNet stem) at 32 px, batch 64,
   with and without the :class:`~manynets.callbacks.Saturation` callback tracking its 21 Conv2d/Linear layers
   (train batches; the epoch-end all-reduce + eigen-decompositions + CSV + plots included). Variants: the
   default (float32 products of mean-shifted outputs), float64 products, every 4th batch. Then tracked / untracked
   steps interleaved on one model (the batch-end covariance updates: today's against the previous one, which
   copied the (B*H*W, C) permutation, converted each batch to float64 for its sum, centred a copy and multiplied
   the full D x D products), and the epoch end amortised over a CIFAR-10 epoch.
   Official numbers for comparison (delve): 1.14x / 1.19-1.29x.
   Agreement of the float32 default with float64: eigenvalues and saturation of the same outputs (a few
   training steps of the ResNet-18, and the covariance test sets), max relative error.
2. Probes: all-layer linear probes from one pass (:class:`~manynets.lightning_modules.ProbeModule`, ``solver``
   ``lbfgs``: features of one epoch kept in memory and fitted exactly; ``sgd``: streamed over epochs) against
   extracting the features to disk and fitting scikit-learn ``LogisticRegression(solver='saga', max_iter=100)`` per layer
   (PHD-LAB's recipe), on the same layers of a small VGG on the bundled digits; time ratio, and per method the
   largest per-layer gap in test accuracy to the converged optimum of the same objective (lbfgs on
   standardised features): saga with 100 iterations on raw features is far from converged.

    python benchmarks/probe.py --batches 24 --rounds 3 --pairs 15 [--threads 1 --clock cpu] [--skip epochs probes]
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

from manynets.analysis import LayerTap, SaturationTracker, extract_features, select_layers
from manynets.callbacks import Saturation
from manynets.layers.covariance import StreamingCovariance, count_from_eigenvalues, eigen_descending, layer_samples
from manynets.lightning_modules import ClassifierModule, ProbeModule
from manynets.networks import VGG, ResNet

warnings.filterwarnings("ignore")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


class EpochTimer(pl.Callback):
    """Time (wall or CPU, ``--clock``) of the epoch's training steps and of the epoch-end work of the
    callbacks before it."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_step = clock()

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps = self.last_step - self.start
        self.epoch_end = clock() - self.last_step


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
        "Saturation (default: float32)": lambda: [Saturation(modes=["train"], dirpath=tmp)],
        "Saturation (float64 products)": lambda: [Saturation(modes=["train"], matmul_dtype="float64", dirpath=tmp)],
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


class PreviousCovariance(StreamingCovariance):
    """The previous update: float32 mode converts the batch to float64 for its sum, centres a copy and
    multiplies the full D x D products; its fold adds the float64 batch sums' outer products."""

    def update(self, samples: torch.Tensor) -> None:
        x = samples.detach().to(self.matmul_dtype)
        self.n += x.shape[0]
        if self.matmul_dtype == torch.float64:
            self.sum_outer.addmm_(x.T, x)
            self.sum += x.sum(0)
            return
        batch_sum = x.sum(0, dtype=torch.float64)
        centred = x - (batch_sum / x.shape[0]).to(x.dtype)
        if self._scatter is None:
            self._scatter = torch.zeros(self.dim, self.dim, dtype=x.dtype, device=x.device)
        self._scatter.addmm_(centred.T, centred)
        self._residuals.append((batch_sum, x.shape[0]))

    def _fold(self) -> None:
        if not self._residuals:
            return
        sums = torch.stack([b for b, _ in self._residuals])
        counts = sums.new_tensor([n for _, n in self._residuals])
        self.sum_outer += self._scatter.double()
        self.sum_outer.addmm_(sums.T, sums / counts[:, None])
        self.sum += sums.sum(0)
        self._scatter.zero_()
        self._residuals = []


def previous_flush(tracker: SaturationTracker) -> None:
    """The previous batch-end update: every output through ``layer_samples`` (a (B*H*W, C) copy of a conv
    map) and the previous ``StreamingCovariance.update``."""
    mode, pending, tracker._pending = tracker.mode, tracker._pending, []
    per_mode = tracker.covariances.setdefault(mode, {})
    for name, output in pending:
        samples = layer_samples(output, tracker.conv_method, tracker.downsampling)
        if name not in per_mode:
            per_mode[name] = PreviousCovariance(samples.shape[1], samples.device, tracker.matmul_dtype)
        per_mode[name].update(samples)


def paired_step_overhead(rounds: int, device: str, clock) -> tuple[dict[str, float], dict[str, float], float]:
    """Per variant, the median over rounds of (tracked step time / untracked step time of the same round),
    one model, variants in rotating order; and the seconds of ``compute`` (all-reduce + 21 eigen-decompositions)
    per dtype; and the median seconds of an untracked step. The untracked step runs with the hooks removed (a
    model without the callback)."""
    torch.manual_seed(0)
    net = ResNet(10).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    layers = select_layers(net)
    tracker = SaturationTracker(layers)
    variants = {  # mode key: (product dtype, batch-end update)
        "untracked": (None, None),
        "float32 (default)": (torch.float32, SaturationTracker.flush),
        "float64": (torch.float64, SaturationTracker.flush),
        "float32, previous update": (torch.float32, previous_flush),
        "float64, previous update (previous default)": (torch.float64, previous_flush),
    }

    def step(name: str) -> float:
        dtype, flush = variants[name]
        if dtype is None:
            tracker.tap.remove()
        tracker.matmul_dtype = dtype or torch.float64
        tracker.start(None if dtype is None else name)
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if flush is not None:
            flush(tracker)  # what the callback does at the batch end
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = clock() - start
        if dtype is None:
            tracker.tap = LayerTap(layers, tracker._record)
        return elapsed

    names = list(variants)
    for name in names * 2:
        step(name)
    ratios = {name: [] for name in names[1:]}
    untracked = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {name: step(name) for name in order}
        untracked.append(got["untracked"])
        for name in names[1:]:
            ratios[name].append(got[name] / got["untracked"])
    compute = {}
    for name in ("float32 (default)", "float64"):
        start = clock()
        tracker.compute(name)
        compute[name] = clock() - start
    tracker.remove()
    return {name: statistics.median(v) for name, v in ratios.items()}, compute, statistics.median(untracked)


def relative_errors(outputs: list[list[torch.Tensor]]) -> tuple[float, float, float, int]:
    """Float32 default vs float64 products on the same outputs, one list of batches per layer: max over layers
    of max_k |λ32_k - λ64_k| / λ64_max, of the same for the eigenvalues above 1e-3 λ64_max relative to
    themselves, of |saturation32 - saturation64|, and the number of layers whose ID differs."""
    eig, eig_rel, sat, differ = 0.0, 0.0, 0.0, 0
    for batches in outputs:
        covs = {}
        for dtype in (torch.float32, torch.float64):
            cov = StreamingCovariance(batches[0].shape[1], matmul_dtype=dtype)
            for out in batches:
                cov.update_maps(out) if out.dim() == 4 else cov.update(out)
            covs[dtype] = cov.covariance()
        lam32, lam64 = (eigen_descending(covs[d])[0] for d in (torch.float32, torch.float64))
        top = lam64[0].clamp_min(1e-300)
        eig = max(eig, ((lam32 - lam64).abs().max() / top).item())
        big = lam64 > 1e-3 * top
        eig_rel = max(eig_rel, ((lam32 - lam64)[big].abs() / lam64[big]).max().item())
        d32, d64 = count_from_eigenvalues(lam32, 0.99), count_from_eigenvalues(lam64, 0.99)
        sat = max(sat, abs(d32 - d64) / len(lam64))
        differ += d32 != d64
    return eig, eig_rel, sat, differ


def agreement(device: str, steps: int) -> list[tuple[str, int, float, float, float, int]]:
    """Rows (data, layers, eigenvalue error / λmax, error of the eigenvalues > 1e-3 λmax, saturation error,
    layers with a different ID) of the float32 default against float64 products."""
    rows = []
    torch.manual_seed(0)
    net = ResNet(10).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    layers = select_layers(net)
    outputs = {name: [] for name in layers}
    with LayerTap(layers, lambda name, out: outputs[name].append(out.detach().clone())):
        for _ in range(steps):  # training steps: the outputs of a network that moves
            x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    rows.append((f"ResNet-18 32 px, {steps} training steps of 64", len(layers), *relative_errors(list(outputs.values()))))
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.01, 3, 32)
    tests = {  # the covariance test sets: isotropic, anisotropic, large mean / small spread, low rank, conv maps
        "isotropic N(0, I), 32 wide": [torch.randn(256, 32, generator=g) for _ in range(4)],
        "anisotropic, mean 7": [torch.randn(n, 32, generator=g) * scale + 7 for n in (5, 13, 1, 40)],
        "mean 1000, spread 0.01-0.04": [torch.randn(n, 4, generator=g) * torch.tensor([0.01, 0.02, 0.03, 0.04]) + 1000
                                        for n in (64, 7, 300)],
        "rank 8 in width 32": [torch.randn(128, 8, generator=g) @ torch.randn(8, 32, generator=g) for _ in range(4)],
        "conv maps (8, 16, 8, 8), mean 5": [torch.randn(8, 16, 8, 8, generator=g) * 2 + 5 for _ in range(4)],
    }  # fmt: skip
    for name, batches in tests.items():
        rows.append((name, 1, *relative_errors([batches])))
    return rows


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
    parser.add_argument("--pairs", type=int, default=15, help="rounds of interleaved tracked/untracked steps")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (robust to other load on a shared machine)")
    parser.add_argument("--agreement-steps", type=int, default=4, help="ResNet-18 steps of the float32 agreement")
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", choices=["epochs", "steps", "saturation", "probes"], nargs="*", default=[],
                        help="parts to skip: the Lightning epochs of the saturation table, its paired steps and "
                             "float32 agreement, all of the saturation part, the probes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    tmp = tempfile.mkdtemp()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock")
    if "saturation" not in args.skip:
        n = len(select_layers(ResNet(10)))
    if "saturation" not in args.skip and "epochs" not in args.skip:
        print(f"\nSaturation overhead: ResNet-18 (ImageNet stem) 32 px, batch 64, {n} tracked layers, "
              f"{args.batches} batches/epoch, median of {args.rounds}")  # fmt: skip
        print(f"{'variant':32s} {'ms/step':>8s} {'steps':>6s} {'end s':>6s} {'epoch':>6s} {'CIFAR-10 epoch':>15s}")
        for name, ms, step_ratio, end, short, cifar in saturation_table(args.batches, args.rounds, args.device, tmp):
            print(f"{name:32s} {ms:8.1f} {step_ratio:6.3f} {end:6.2f} {short:6.3f} {cifar:15.3f}")
        print(f"steps, epoch: ratios to no callback over the timed {args.batches}-batch epoch; CIFAR-10 epoch: "
              f"per-step times scaled to {CIFAR10_BATCHES} batches + the measured epoch end")
    if "saturation" not in args.skip and "steps" not in args.skip:
        paired, compute, untracked_s = paired_step_overhead(args.pairs, args.device, clock)
        epoch_end = {"float32 (default)": compute["float32 (default)"], "float64": compute["float64"]}
        print(f"\ntracked / untracked step ({args.clock} clock), median of {args.pairs} rounds of interleaved "
              f"steps on one model (batch-end update included); + epoch end: compute() (all-reduce + "
              f"{n} eigen-decompositions) amortised over a CIFAR-10 epoch of {CIFAR10_BATCHES} steps")  # fmt: skip
        print(f"{'variant':46s} {'step':>7s} {'+ epoch end':>12s}")
        for name, ratio in paired.items():
            dtype = "float32 (default)" if name.startswith("float32") else "float64"
            amortised = ratio + epoch_end[dtype] / (CIFAR10_BATCHES * untracked_s)
            print(f"{name:46s} {ratio:7.3f} {amortised:12.3f}")
        print(f"untracked step {1e3 * untracked_s:.1f} ms; compute() seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in compute.items())
              + "; the CSV and plots are in the CIFAR-10 epoch column above")  # fmt: skip
        print("\nAgreement of the float32 default with float64 products (max over layers)")
        print(f"{'data':44s} {'layers':>6s} {'|dλ|/λmax':>10s} {'|dλ|/λ (λ>1e-3λmax)':>20s} {'|dsat|':>8s} {'ID differs':>10s}")
        for name, count, eig, eig_rel, sat, differ in agreement(args.device, args.agreement_steps):
            print(f"{name:44s} {count:6d} {eig:10.2e} {eig_rel:20.2e} {sat:8.4f} {differ:10d}")
    if "probes" not in args.skip:
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

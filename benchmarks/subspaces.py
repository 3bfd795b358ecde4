"""Subspaces benchmark: cost of training a line, and of the 21-point sweep's BN statistics.

1. One training step (forward, CE (+ beta cos^2), backward, SGD step) of a line of cResNet-20s
   against the plain cResNet-20, batch 128, 32x32: median ratio of alternating step pairs (official overhead: 1.08x).
2. The BN statistics + test logits of 21 points (alpha = 0, 0.05, ..., 1): one pass over the
   training data per point (official ``update_bn``, 21 passes; the official sweep does 42) against
   ONE pass with the points packed ``points_per_pass`` at a time (``collect_bn_statistics``), with
   the training data read through a DataLoader with augmentation (as in a real sweep).

    python benchmarks/subspaces.py [--device cuda] [--train-batches 8] [--sweep-batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from manynets.datamodules.digits import UInt8ImageDataset
from manynets.layers.subspace import subspace_coefficients
from manynets.layers.subspace_bn import collect_bn_statistics, packed_logits, recompute_bn
from manynets.lightning_modules import SubspaceModule
from manynets.networks import CifarResNet


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_training_step(device, batch: int, warmup: int, iters: int) -> list[tuple[str, float]]:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    plain = CifarResNet(10).to(device)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    line = SubspaceModule(CifarResNet, 10, (3, 32, 32), kind="line").to(device)
    opt_line = torch.optim.SGD(line.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step_plain():
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()

    def step_line():
        opt_line.zero_grad(set_to_none=True)
        line.training_loss(x, y)[0].backward()
        opt_line.step()

    def timed(step) -> float:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        step_plain(), step_line()
    plain_t, line_t, ratios = [], [], []
    for i in range(2 * iters):  # alternating pairs, the order swapped every pair (ABBA): drift cancels
        a, b = (timed(step_plain), timed(step_line)) if i % 2 == 0 else reversed((timed(step_line), timed(step_plain)))
        plain_t.append(a)
        line_t.append(b)
        ratios.append(b / a)
    ratio = statistics.median(ratios)
    plain_median = statistics.median(plain_t)
    return [("train step: plain cResNet-20", plain_median), ("train step: line (beta=1)", plain_median * ratio)]


def bench_sweep(device, train_batches: int, batch: int, points_per_pass: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    n = train_batches * batch
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # fmt: skip
    loader = DataLoader(UInt8ImageDataset(images, labels, augment), batch_size=batch, shuffle=True)
    test_x = torch.randn(batch, 3, 32, 32, device=device)
    net = SubspaceModule(CifarResNet, 10, (3, 32, 32), kind="line").network.to(device)
    points = subspace_coefficients("line", torch.linspace(0, 1, 21)).to(device)

    def one_pass_per_point():
        for c in points:
            recompute_bn(net, loader, c)
            net.eval()
            with torch.no_grad():
                net(test_x)
            net.train()

    def packed(k):
        def run():
            stats = collect_bn_statistics(net, loader, points, chunk_size=k)
            for lo in range(0, len(points), k):
                sub = {name: (m[lo : lo + k], v[lo : lo + k]) for name, (m, v) in stats.items()}
                packed_logits(net, test_x, points[lo : lo + k], sub)

        return run

    base = time_steps(one_pass_per_point, device, 0, 1)
    report("sweep 21 pts: one pass per point (official update_bn)", base, 1.0)
    for k in points_per_pass:
        t = time_steps(packed(k), device, 0, 1)
        report(f"sweep 21 pts: one pass, {k} points per forward", t, base / t)


def report(name: str, t: float, ratio: float) -> None:
    print(f"{name:56s} {t:10.4f} {ratio:7.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-batches", type=int, default=8, help="training batches per BN pass")
    parser.add_argument("--sweep-batch", type=int, default=128, help="batch size of the BN passes")
    parser.add_argument("--skip-train", action="store_true", help="only the sweep")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--points-per-pass", type=int, nargs="+", default=[21, 7, 1])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'measurement':56s} {'time (s)':>10s} {'ratio':>8s}")
    if not args.skip_train:
        rows = bench_training_step(device, args.batch, 3, args.iters)
        for name, t in rows:
            report(f"{name} (batch {args.batch}; ratio vs plain)", t, t / rows[0][1])
    print(f"sweep: {args.train_batches} training batches of {args.sweep_batch} per BN pass + 1 test batch per point; "
          "ratio = one-pass-per-point time / this time", flush=True)
    bench_sweep(device, args.train_batches, args.sweep_batch, args.points_per_pass)


if __name__ == "__main__":
    main()

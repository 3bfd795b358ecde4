"""Subspaces benchmark: cost of training a line, and of the 21-point sweep's BN statistics.

1. One training step (forward, CE + beta cos^2, backward, SGD step) of a line of cResNet-20s against
   the plain cResNet-20, batch 128, 32x32 (official overhead: 1.08x). Two line variants on the same
   module: ``combined`` (today: every layer's parameters combined at once with foreach ops, cos^2 with a
   closed-form gradient) and ``per-layer`` (the previous formulation: each layer combines its own sets
   in its forward, cos^2 from per-layer sums). Variants interleaved in rotating order, ratio to the
   plain step of the same round, median over rounds.
2. The BN statistics + test logits of 21 points (alpha = 0, 0.05, ..., 1), training data read through
   a DataLoader with augmentation (as in a real sweep). Baseline: the official sweep under ``no_grad``
   (per point: reset, momentum None, one pass in train mode; the layers combine their sets in every
   forward). Against it: ``recompute_bn`` per point (one pass per point, the point combined once per
   pass), the default CPU path (each batch loaded once, points one at a time), the previous CPU path
   (same, but the point and per-point buffers set per forward through ``packed_points`` and combined
   per layer), and points packed k at a time in one forward (the CUDA path). Rounds interleaved, median.

    python benchmarks/subspaces.py [--device cuda] [--threads 1] [--rounds 5] [--train-batches 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from manynets.analysis.bn_recompute import collect_bn_statistics, recompute_bn
from manynets.datamodules.digits import UInt8ImageDataset
from manynets.layers.subspace import _SubspaceBatchNorm, set_point, subspace_coefficients, subspace_layers
from manynets.layers.subspace_bn import bn_layers, packed_logits, packed_points
from manynets.lightning_modules import SubspaceModule
from manynets.networks import CifarResNet


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(fn, device) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved(variants: dict, device, rounds: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Per variant: (median seconds, median ratio to the first variant of the same round); the order
    rotates every round so drift and other load hit every variant alike."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {name: timed(variants[name], device) for name in order}
        for name in names:
            times[name].append(got[name])
            ratios[name].append(got[name] / got[names[0]])
    return {name: (statistics.median(times[name]), statistics.median(ratios[name])) for name in names}


# -- 1. training step --------------------------------------------------------------------------
def per_layer_cos2(layers, i: int, j: int) -> torch.Tensor:
    """The previous regulariser: per-layer dot products and norms, summed (spec §3.2)."""
    dots, ni, nj = [], [], []
    for layer in layers:
        if isinstance(layer, _SubspaceBatchNorm):
            continue
        wi, wj = layer.parameter_sets("weight")[i], layer.parameter_sets("weight")[j]
        dots.append((wi * wj).sum())
        ni.append(wi.pow(2).sum())
        nj.append(wj.pow(2).sum())
    return torch.stack(dots).sum().pow(2) / (torch.stack(ni).sum() * torch.stack(nj).sum())


def bench_training_step(device, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    plain = CifarResNet(10).to(device)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    line = SubspaceModule(CifarResNet, 10, (3, 32, 32), kind="line").to(device)
    opt_line = torch.optim.SGD(line.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    layers = subspace_layers(line.network)

    def step_plain():
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()

    def step_combined():
        opt_line.zero_grad(set_to_none=True)
        line.training_loss(x, y)[0].backward()
        opt_line.step()

    def step_per_layer():
        opt_line.zero_grad(set_to_none=True)
        line.sample_point()
        i, j = torch.randperm(2)[:2].tolist()
        loss = F.cross_entropy(line.network(x), y) + per_layer_cos2(layers, i, j)
        loss.backward()
        opt_line.step()

    variants = {"plain cResNet-20": step_plain, "line, combined (today)": step_combined,
                "line, per-layer (previous)": step_per_layer}  # fmt: skip
    return interleaved(variants, device, rounds, warmup=2)


# -- 2. BN statistics of the sweep -------------------------------------------------------------
@torch.no_grad()
def official_update_bn(net, loader, coefficients, device) -> None:
    """The official ``update_bn`` under no_grad: reset, momentum None, one pass in train mode; the
    layers combine their sets in every forward (as the official layers do)."""
    set_point(net, coefficients)
    bns = [m for _, m in bn_layers(net)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for images, _ in loader:
        net(images.to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


@torch.no_grad()
def previous_collect(net, loader, points, device) -> dict:
    """The previous one-point-per-forward path: point and per-point buffers set per forward with
    ``packed_points``, each layer combining its sets in its forward."""
    named = bn_layers(net)
    p = len(points)
    buffers = {n: (torch.zeros(p * m.num_features, device=device), torch.ones(p * m.num_features, device=device))
               for n, m in named}  # fmt: skip
    counts = {(n, c): [0] for n, _ in named for c in range(p)}
    net.train()
    for images, _ in loader:
        x = images.to(device)
        for c in range(p):
            stats = {}
            for n, m in named:
                mean, var = buffers[n]
                k = m.num_features
                stats[n] = (mean[c * k : (c + 1) * k], var[c * k : (c + 1) * k], counts[(n, c)])
            with packed_points(net, points[c : c + 1], stats):
                net(x)
    return {n: (mean.view(p, -1), var.view(p, -1)) for n, (mean, var) in buffers.items()}


def bench_sweep(device, train_batches: int, batch: int, points_per_pass: list[int], rounds: int):
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

    def test_logits(stats, k):
        for lo in range(0, len(points), k):
            sub = {name: (m[lo : lo + k], v[lo : lo + k]) for name, (m, v) in stats.items()}
            packed_logits(net, test_x, points[lo : lo + k], sub)

    def official():
        for c in points:
            official_update_bn(net, loader, c, device)
            net.eval()
            with torch.no_grad():
                net(test_x)
            net.train()

    def per_point_pass():
        for c in points:
            recompute_bn(net, loader, c)
            net.eval()
            with torch.no_grad():
                net(test_x)
            net.train()

    def previous():
        test_logits(previous_collect(net, loader, points, device), 1)

    def chunked(k):
        return lambda: test_logits(collect_bn_statistics(net, loader, points, chunk_size=k), k)

    variants = {
        "official update_bn per point, no_grad (baseline)": official,
        "recompute_bn per point (one pass per point)": per_point_pass,
        "each batch once, 1 point per forward (CPU default)": chunked(1),
        "each batch once, 1 point per forward (previous)": previous,
    }
    for k in points_per_pass:
        if k > 1:
            variants[f"each batch once, {k} points packed per forward"] = chunked(k)
    return interleaved(variants, device, rounds, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the training steps")
    parser.add_argument("--sweep-rounds", type=int, default=3, help="interleaved rounds of the BN sweep")
    parser.add_argument("--train-batches", type=int, default=4, help="training batches per BN pass")
    parser.add_argument("--sweep-batch", type=int, default=128, help="batch size of the BN passes")
    parser.add_argument("--skip", choices=["train", "sweep"], default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall",
                        help="wall time, or the process's CPU time (with --threads 1: robust to other load on a "
                             "shared machine)")  # fmt: skip
    parser.add_argument("--points-per-pass", type=int, nargs="*", default=[21], help="packed variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCK[args.clock]
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock")
    if args.skip != "train":
        print(f"\n1. training step, batch {args.batch}, 32x32, forward + CE (+ cos^2) + backward + SGD step; "
              f"median of {args.rounds} interleaved rounds")  # fmt: skip
        print(f"{'variant':52s} {'ms/step':>8s} {'vs plain':>9s}")
        rows = bench_training_step(device, args.batch, args.rounds)
        for name, (t, ratio) in rows.items():
            print(f"{name:52s} {1e3 * t:8.1f} {ratio:8.3f}x", flush=True)
        combined, previous = rows["line, combined (today)"][1], rows["line, per-layer (previous)"][1]
        print(f"line step, combined / per-layer: {combined / previous:.3f}")
    if args.skip != "sweep":
        print(f"\n2. BN statistics + test logits of 21 points; {args.train_batches} training batches of "
              f"{args.sweep_batch} (DataLoader, crop + flip) per pass, 1 test batch; median of "
              f"{args.sweep_rounds} interleaved rounds; ratio = time / baseline time (lower is faster)")
        print(f"{'variant':52s} {'seconds':>8s} {'ratio':>9s}")
        for name, (t, ratio) in bench_sweep(device, args.train_batches, args.sweep_batch, args.points_per_pass,
                                            args.sweep_rounds).items():  # fmt: skip
            print(f"{name:52s} {t:8.2f} {ratio:8.3f}x", flush=True)


if __name__ == "__main__":
    main()

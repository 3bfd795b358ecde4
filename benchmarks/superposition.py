"""MIMOConv superposition: throughput per n, training-step cost and the binding op, in one process.

Tables (BENCHMARKS.md targets in brackets):

1. Inference images/s (eval, no grad) of an N = 4 HRR MIMONet at n = 1, 2, 4 and of the plain
   WideResNet of the same depth/width (N = 1, no binding), ratios to n = 1 [n=4 / n=1 >= 3.9].
2. Training step (forward, loss incl. R_bind and R_iso, backward, SGD step) of the N = 4 model on
   128 images (32 superposed maps in the body) against the N = 1 model on 32 images [<= 2.0x].
3. HRR bind-and-bundle: our FFT custom op against the official grouped Conv1d formulation (forward,
   and forward + backward), and the binding's share of the N = 4 training step [<= 5 %].

Timings are medians over rounds that alternate between the compared models, to cancel drift on a
shared machine (each round times ``steps`` calls).

    python benchmarks/superposition.py                     # CPU, 2 threads, MIMONet-16 and -28 width 2
    python benchmarks/superposition.py --depths 16 --rounds 3
    python benchmarks/superposition.py --device cuda --width 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from manynets.cuda_ops.binding import (
    grouped_conv1d_bind,
    hrr_bind_bundle,
    key_to_conv1d_weight,
)
from manynets.lightning_modules import SuperpositionModule
from manynets.networks import WideResNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def alternate(fns: dict[str, callable], device: torch.device, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, rounds interleaved (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, steps))
    return {k: statistics.median(v) for k, v in times.items()}


def mimonet(depth: int, width: int, capacity: int, binding: str, device: torch.device) -> SuperpositionModule:
    backbone = partial(WideResNet, depth=depth, width=width, initial_width=4, activation="prelu",
                       stem_norm_act=True, shortcut_norm=True, final_norm_act=False)  # fmt: skip
    module = SuperpositionModule(backbone, num_classes=10, image_shape=(3, 32, 32), capacity=capacity,
                                 binding=binding, isometry_weight=1e-4, mixup_alpha=1.0)  # fmt: skip
    module.log_dict = lambda *a, **k: None  # outside a Trainer
    return module.to(device)


def inference_table(depth: int, width: int, batch: int, device, steps: int, rounds: int) -> list[str]:
    model = mimonet(depth, width, 4, "hrr", device).eval()
    plain = mimonet(depth, width, 1, "none", device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    fns = {f"n={n}": (lambda n=n: model.forward_superposed(x, n)) for n in (1, 2, 4)}
    fns["plain"] = lambda: plain.forward_superposed(x, 1)
    with torch.inference_mode():
        t = alternate(fns, device, steps, rounds)
    ips = {k: batch / v for k, v in t.items()}
    rows = [f"MIMONet-{depth}-{width} N=4 HRR, eval, batch {batch}"]
    for k in ("plain", "n=1", "n=2", "n=4"):
        rows.append(f"  {k:6s} {ips[k]:9.1f} img/s   x{ips[k] / ips['n=1']:.2f} vs n=1   x{ips[k] / ips['plain']:.2f} vs plain")
    return rows


def train_table(depth: int, width: int, device, steps: int, rounds: int) -> tuple[list[str], float]:
    big = mimonet(depth, width, 4, "hrr", device).train()
    small = mimonet(depth, width, 1, "hrr", device).train()
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (big, small)}
    x4, y4 = torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)
    x1, y1 = x4[:32].contiguous(), y4[:32].contiguous()

    def step(model, x, y):
        opt = opts[model]
        opt.zero_grad(set_to_none=True)
        model.training_loss(x, y)[0].backward()
        opt.step()

    t = alternate({"N=4": lambda: step(big, x4, y4), "N=1": lambda: step(small, x1, y1)}, device, steps, rounds)
    rows = [f"MIMONet-{depth}-{width} HRR train step (mixup, R_bind, R_iso, SGD)",
            f"  N=1, 32 images   {t['N=1'] * 1e3:8.1f} ms",
            f"  N=4, 128 images  {t['N=4'] * 1e3:8.1f} ms   x{t['N=4'] / t['N=1']:.2f} (target <= 2.0)"]  # fmt: skip
    return rows, t["N=4"]


def binding_table(channels: int, groups: int, size: int, device, steps: int, rounds: int, train_step: float | None):
    x = torch.randn(groups, 4, channels, size, size, device=device, requires_grad=True)
    weight = (torch.rand(4, 1, channels, device=device) * 2 - 1).requires_grad_()

    def ours():
        return hrr_bind_bundle(x, key_to_conv1d_weight(weight[:, 0]))  # method auto: GEMM for C = 64

    def fft():
        return hrr_bind_bundle(x, key_to_conv1d_weight(weight[:, 0]), "fft")

    def conv():
        return grouped_conv1d_bind(x, weight).sum(1)

    def backward(fn):
        return lambda: fn().sum().backward()

    fns = {"ours (auto)": ours, "ours (fft)": fft, "grouped Conv1d": conv}
    with torch.no_grad():
        fwd = alternate(fns, device, steps, rounds)
    both = alternate({k: backward(f) for k, f in fns.items()}, device, steps, rounds)
    base = "grouped Conv1d"
    rows = [f"HRR bind + bundle, x ({groups}, 4, {channels}, {size}, {size}); speed-up vs the official grouped Conv1d"]
    for k in fns:
        rows.append(f"  {k:15s} forward {fwd[k] * 1e3:8.2f} ms (x{fwd[base] / fwd[k]:.1f})   "
                    f"forward+backward {both[k] * 1e3:8.2f} ms (x{both[base] / both[k]:.1f})")
    if train_step:
        rows.append(f"  share of the N=4 training step (forward+backward): ours {both['ours (auto)'] / train_step:.1%} "
                    f"(target <= 5 %), fft {both['ours (fft)'] / train_step:.1%}, grouped Conv1d {both[base] / train_step:.1%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 28])
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="images per inference call")
    parser.add_argument("--steps", type=int, default=3, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; medians of "
          f"{args.rounds} alternating rounds of {args.steps} calls")
    train_step = None
    for depth in args.depths:
        print("\n".join(inference_table(depth, args.width, args.batch, device, args.steps, args.rounds)))
        rows, step = train_table(depth, args.width, device, args.steps, args.rounds)
        print("\n".join(rows))
        train_step = train_step or step  # binding share against the first (smallest) network
    print("\n".join(binding_table(64, 32, 32, device, args.steps, args.rounds, train_step)))


if __name__ == "__main__":
    main()

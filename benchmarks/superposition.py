"""MIMOConv superposition: inference scaling with n, its per-part time, the training step and the binding op.

Tables (BENCHMARKS.md targets in brackets), each at every ``--threads`` count:

1. ``inference``: eval forward (inference_mode) images/s of an N = 4 HRR MIMONet (default MIMONet-16,
   width 2, initial width 4) at n = 1, 2, 4 and the ratio n=4 / n=1 [>= 3.9], in two configurations:
   *official* (the body sees ``--maps`` = 128 superposed maps at every n: 128·n images, as the
   official evaluation with batch 128·N) and *same images* (128 images at every n). Three paths,
   all interleaved: ``now`` (``forward_superposed``: on a CPU the stem is one GEMM with its BN folded,
   bound by one GEMM over the stacked slots, in chunks of 16 images while in cache when
   single-threaded), ``before`` (the previous path: the stem module on the whole batch, then the
   binding) and, with ``--official``, ``official formulation`` (re-implemented from spec §1.1-1.2, not
   the official code: slots repeated r times, grouped-Conv1d binding, 1x1-conv unbinding; slow on a
   CPU).
2. ``parts``: milliseconds per part (stem, binding, body+pool, unbinding, head) of ``before`` and
   ``now`` at n = 1 and n = 4 of the official configuration, and the stem's GMAC/s.
3. ``train``: training step (forward, loss incl. R_bind and R_iso, backward, SGD step) of the N = 4
   model on 128 images (32 superposed maps in the body) against the N = 1 model on 32 images [<= 2.0x].
4. ``binding``: HRR bind-and-bundle, our custom op against the official grouped Conv1d formulation
   (forward, and forward + backward), and the binding's share of the N = 4 training step [<= 5 %].

Timings are medians over rounds that alternate between the compared variants, to cancel drift on a
shared machine (each round times ``--steps`` calls).

    python benchmarks/superposition.py                              # CPU, 1 and 2 threads, all tables
    python benchmarks/superposition.py --tables inference parts --threads 1 --rounds 7
    python benchmarks/superposition.py --device cuda --width 10 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch

from manynets.cuda_ops.binding import (
    grouped_conv1d_bind,
    hrr_bind_bundle,
    key_to_conv1d_weight,
)
from manynets.layers.conv_gemm import ConvBNReLU
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


def interleaved(fns: dict, device: torch.device, steps: int, rounds: int) -> dict[object, list[float]]:
    """Seconds per call of each fn in each round, rounds interleaved (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, steps))
    return times


def alternate(fns: dict, device: torch.device, steps: int, rounds: int) -> dict[object, float]:
    """Median seconds per call of each fn, rounds interleaved (one warm-up call each first)."""
    return {k: statistics.median(v) for k, v in interleaved(fns, device, steps, rounds).items()}


def mimonet(depth: int, width: int, capacity: int, binding: str, device: torch.device) -> SuperpositionModule:
    backbone = partial(WideResNet, depth=depth, width=width, initial_width=4, activation="prelu",
                       stem_norm_act=True, shortcut_norm=True, final_norm_act=False)  # fmt: skip
    module = SuperpositionModule(backbone, num_classes=10, image_shape=(3, 32, 32), capacity=capacity,
                                 binding=binding, isometry_weight=1e-4, mixup_alpha=1.0)  # fmt: skip
    module.log_dict = lambda *a, **k: None  # outside a Trainer
    return module.to(device)


def previous_forward(model: SuperpositionModule, x: torch.Tensor, n: int, parts: dict | None = None) -> torch.Tensor:
    """The evaluation forward before the chunked GEMM stem: the stem module (conv, BN, ReLU) on the whole
    batch, then the binding (HRR: one circulant GEMM over the slots), body, pool, unbinding, head."""
    net = model.network
    steps = [("stem", net.stem), ("binding", lambda y: model.binding(y.view(y.shape[0] // n, n, *y.shape[1:]))),
             ("body", lambda y: net.pool(net.body(y))), ("unbinding", lambda y: model.unbinding(y, n)),
             ("head", net.head)]  # fmt: skip
    return _run_parts(steps, x, parts)


def current_forward(model: SuperpositionModule, x: torch.Tensor, n: int, parts: dict | None = None) -> torch.Tensor:
    """``forward_superposed`` as it runs in evaluation on a CPU: stem (one GEMM, BN folded) and binding in
    chunks of STEM_CHUNK_IMAGES images, then body, pool, unbinding, head; split into timed parts."""
    net, stem = model.network, model._eval_stem_gemm(x)
    if stem is None:  # not a CPU: forward_superposed runs the previous path
        return previous_forward(model, x, n, parts)
    steps = [("stem+binding", lambda y: model._stem_and_bind_in_chunks(y, n, stem)),
             ("body", lambda y: net.pool(net.body(y))), ("unbinding", lambda y: model.unbinding(y, n)),
             ("head", net.head)]  # fmt: skip
    return _run_parts(steps, x, parts)


def official_forward(model: SuperpositionModule, x: torch.Tensor, n: int) -> torch.Tensor:
    """The official formulation (spec §1.1-1.2, re-implemented here, not the official code): stem module,
    slots repeated r = N/n times, each bound by the grouped Conv1d, summed, body, 1x1-conv unbinding
    (as a Linear), mean over r, head."""
    net, cap = model.network, model.capacity
    y = net.stem(x)
    slots = y.view(y.shape[0] // n, n, *y.shape[1:]).repeat(1, cap // n, 1, 1, 1)
    weight = key_to_conv1d_weight(model.binding.keys)[:, None]
    features = net.pool(net.body(grouped_conv1d_bind(slots, weight).sum(1)))
    unbound = torch.relu(model.unbinding.linear(features)).view(features.shape[0], cap // n, n, -1).mean(1)
    return net.head(unbound.reshape(x.shape[0], -1))


def _run_parts(steps, x, parts: dict | None):
    for name, fn in steps:
        start = time.perf_counter()
        x = fn(x)
        if parts is not None:
            parts.setdefault(name, []).append(time.perf_counter() - start)
    return x


def inference_table(depth: int, width: int, maps: int, device, steps: int, rounds: int,
                    official: bool = False) -> list[str]:
    """images/s at n = 1, 2, 4 of the N = 4 HRR MIMONet, before (previous_forward) and now
    (forward_superposed), at the official configuration (the body sees ``maps`` superposed maps at every
    n: maps·n images) and with the same ``maps`` images at every n; all variants interleaved."""
    model = mimonet(depth, width, 4, "hrr", device).eval()
    images = torch.randn(maps * 4, 3, 32, 32, device=device)
    configs = {"official": {n: images[: maps * n] for n in (1, 2, 4)},
               "same images": {n: images[:maps] for n in (1, 2, 4)}}  # fmt: skip
    paths = {"before": previous_forward, "now": lambda m, x, n: m.forward_superposed(x, n)}
    if official:  # slow on a CPU (the grouped Conv1d binds all N slots at every n): opt-in
        paths = {"official formulation": official_forward, **paths}
    fns = {(c, p, n): (lambda x=x, n=n, f=f: f(model, x, n))
           for c, xs in configs.items() for p, f in paths.items() for n, x in xs.items()}
    with torch.inference_mode():
        now = model.forward_superposed(images, 4)
        assert torch.allclose(now, previous_forward(model, images, 4), rtol=1e-4, atol=1e-4 * now.abs().max().item())
        times = interleaved(fns, device, steps, rounds)
    t = {k: statistics.median(v) for k, v in times.items()}
    rows = [f"MIMONet-{depth}-{width} (initial width 4) N=4 HRR, eval forward under inference_mode, "
            f"{torch.get_num_threads()} thread(s); images/s (time of the whole forward, median of {rounds} "
            f"interleaved rounds of {steps} calls); n=4/n=1: median over rounds of the ratio within a round",
            f"  {'configuration':38s} {'path':22s} {'n=1':>8s} {'n=2':>8s} {'n=4':>8s}  "
            f"n=4/n=1 (target >= 3.9)"]  # fmt: skip
    for c, xs in configs.items():
        label = (f"official: body sees {maps} maps ({maps}·n images)" if c == "official"
                 else f"same images: {maps} images at every n")
        for p in paths:
            ips = {n: xs[n].shape[0] / t[(c, p, n)] for n in xs}
            # the ratio of the n = 4 and n = 1 calls of one round (seconds apart), median over the rounds
            ratio = statistics.median(xs[4].shape[0] / xs[1].shape[0] * t1 / t4
                                      for t1, t4 in zip(times[(c, p, 1)], times[(c, p, 4)]))
            rows.append(f"  {label:38s} {p:22s} {ips[1]:8.1f} {ips[2]:8.1f} {ips[4]:8.1f}  x{ratio:.2f}")
    return rows


def parts_table(depth: int, width: int, maps: int, device, rounds: int) -> list[str]:
    """Milliseconds per part of the forward at the official configuration, before and now, n = 1 and 4
    (interleaved; the GEMM stem and the binding are also timed apart, on the whole batch)."""
    model = mimonet(depth, width, 4, "hrr", device).eval()
    images = torch.randn(maps * 4, 3, 32, 32, device=device)
    parts: dict = {}
    stem = ConvBNReLU.match(model.network.stem)

    def gemm_stem_then_binding(x, n):
        _run_parts([("  GEMM stem (whole batch)", stem),
                    ("  binding (whole batch)", lambda y: model.binding.bind_stacked(
                        y.view(y.shape[0] // n, n * y.shape[1], -1), n))], x, parts[("now", n)])  # fmt: skip

    with torch.inference_mode():
        for _ in range(rounds + 1):
            for n in (1, 4):
                x = images[: maps * n]
                previous_forward(model, x, n, parts.setdefault(("before", n), {}))
                current_forward(model, x, n, parts.setdefault(("now", n), {}))
                gemm_stem_then_binding(x, n)
    med = {k: {p: statistics.median(v[1:]) * 1e3 for p, v in d.items()} for k, d in parts.items()}
    rows = [f"Per-part time (ms, median of {rounds} interleaved rounds, first dropped), "
            f"MIMONet-{depth}-{width} N=4 HRR, "
            f"official configuration (n=1: {maps} images, n=4: {maps * 4} images), {torch.get_num_threads()} thread(s)",
            f"  {'part':28s} {'before n=1':>11s} {'before n=4':>11s} {'now n=1':>9s} {'now n=4':>9s}"]  # fmt: skip
    names = ["stem", "binding", "stem+binding", "  GEMM stem (whole batch)", "  binding (whole batch)", "body",
             "unbinding", "head"]  # fmt: skip
    for name in names:
        cells = [med[(p, n)].get(name) for p in ("before", "now") for n in (1, 4)]
        rows.append(f"  {name:28s} " + " ".join(f"{'-' if c is None else f'{c:.1f}':>{w}s}"
                                                 for c, w in zip(cells, (11, 11, 9, 9))))  # fmt: skip
    totals = {k: sum(v for p, v in d.items() if not p.startswith("  ")) for k, d in med.items()}
    rows.append(f"  {'total':28s} {totals[('before', 1)]:11.1f} {totals[('before', 4)]:11.1f} "
                f"{totals[('now', 1)]:9.1f} {totals[('now', 4)]:9.1f}")
    macs = 27 * model.network.stem_channels * 32 * 32 * maps * 4  # the n = 4 stem
    rows.append(f"  stem conv rate at n=4: before {macs / med[('before', 4)]['stem'] / 1e6:.1f} GMAC/s, "
                f"GEMM {macs / med[('now', 4)]['  GEMM stem (whole batch)'] / 1e6:.1f} GMAC/s (BN and ReLU included)")
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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="each table runs at each count")
    parser.add_argument("--depths", type=int, nargs="+", default=[16])
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--maps", type=int, default=128, help="superposed maps in the body per inference call")
    parser.add_argument("--steps", type=int, default=1, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--official", action="store_true",
                        help="add the official formulation to the inference table (slow on a CPU)")
    parser.add_argument("--tables", nargs="+", default=["inference", "parts", "train", "binding"],
                        choices=["inference", "parts", "train", "binding"])
    args = parser.parse_args()
    device = torch.device(args.device)
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        print(f"\ntorch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s); medians of "
              f"{args.rounds} alternating rounds of {args.steps} call(s); load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")
        train_step = None
        for depth in args.depths:
            if "inference" in args.tables:
                print("\n".join(inference_table(depth, args.width, args.maps, device, args.steps, args.rounds,
                                                 args.official)))
            if "parts" in args.tables:
                print("\n".join(parts_table(depth, args.width, args.maps, device, args.rounds)))
            if "train" in args.tables:
                rows, step = train_table(depth, args.width, device, args.steps, args.rounds)
                print("\n".join(rows))
                train_step = train_step or step  # binding share against the first (smallest) network
        if "binding" in args.tables:
            print("\n".join(binding_table(64, 32, 32, device, args.steps, args.rounds, train_step)))


if __name__ == "__main__":
    main()

"""π-net step time and peak memory as the state grows: chunked kernel vs the straightforward formulation.

Setup of BENCHMARKS.md: infinite PiMLP r=100 with one infinite hidden layer and the readout (``depth: 2`` in manynets =
``pilimit_lib`` depth 1; state 118.6 MiB at M = 1e5 in fp32, the official 119 MiB), batch 8, CIFAR-sized inputs.
Every layer is first grown to M rows, then a few training steps (forward, backward, π-SGD append) are timed.

- ``chunked``: manynets (kernel streamed over M in chunks of ``--chunk`` rows, amortised appends);
- ``unchunked``: the straightforward formulation: one (batch x M) matrix per layer, autograd through it for
  the input gradient, ``torch.cat`` to append rows (what a direct port of the formulas does).

Step time is the minimum over the timed steps (robust to other load on the machine). Each case runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own; "extra" is the peak minus
the RSS after the state was allocated. Official numbers (GPU): 6 / 21 / 165 ms per step at 1e3 / 1e4 / 1e5.
Usage: ``python benchmarks/pinet.py [--rows 1e3 1e4 1e5 1e6] [--steps 3] [--chunk 16384] [--threads 1] [--ram-gib 24]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _grow(net, m: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for layer in net.layers()[1:]:
        layer.resize_rows(m)
        layer.A.data.normal_(0, 0.01, generator=gen)
        B = torch.randn(layer.B.shape, generator=gen)
        layer.B.data.copy_(B / B.norm(dim=1, keepdim=True))
        layer.Amult.data.fill_(-0.01)


def _naive_step(net, x, y, lr: float) -> None:
    from manynets.cuda_ops.pi_kernel import pi_forward_reference

    g = net.stem(x)
    saved = []
    for layer in net.layers()[1:]:
        s = g.norm(dim=1)
        gbar = g / s[:, None]
        out = pi_forward_reference(gbar, s, layer.A, layer.B, layer.Amult)
        out.retain_grad()
        saved.append((layer, out, s, gbar))
        g = out + layer.bias_alpha * layer.bias
    loss = torch.nn.functional.cross_entropy(net.head.alpha * g, y)
    loss.backward()
    with torch.no_grad():
        for layer, out, s, gbar in saved:
            layer.A.data = torch.cat([layer.A.data, out.grad * s[:, None]])
            layer.B.data = torch.cat([layer.B.data, gbar.detach()])
            layer.Amult.data = torch.cat([layer.Amult.data, torch.full((len(s),), -lr)])
        for p in net.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def run_case(method: str, m: int, steps: int, chunk: int, batch: int) -> dict:
    from manynets.networks import PiMLP
    from manynets.layers.pi_optim import PiSGD

    torch.manual_seed(0)
    net = PiMLP(10, (3, 32, 32), r=100, depth=2, chunk_size=chunk, seed=0)
    _grow(net, m)
    state = net.state_bytes()
    opt = PiSGD([p for p in net.parameters() if p.requires_grad] + [l.Amult for l in net.layers()[1:]], lr=0.01)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    base = _rss_bytes()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        if method == "chunked":
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            _naive_step(net, x, y, 0.01)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "rows": m, "ms": 1000 * min(times[1:]), "state": state,
            "extra": max(peak - base, 0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16384, help="rows per chunk (the library default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP barrier costs on a shared box)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ram-gib", type=float, default=24.0, help="RAM for the out-of-memory extrapolation")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(float(args.case[1])), args.steps, args.chunk, args.batch)))
        return
    results = {}
    for m in (int(r) for r in args.rows):
        for method in ("unchunked", "chunked"):
            cmd = [sys.executable, __file__, "--case", method, str(m), "--steps", str(args.steps),
                   "--chunk", str(args.chunk), "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                results[(method, m)] = None
                print(f"{method} M={m}: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
                continue
            results[(method, m)] = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"PiMLP r=100 depth 2 (lib depth 1), batch {args.batch}, chunk {args.chunk}, {torch.get_num_threads()} threads")
    print(f"{'M rows':>9} | {'state MiB':>9} | {'unchunked ms':>12} | {'chunked ms':>10} | {'speed-up':>8} | "
          f"{'unchunked extra MiB':>19} | {'chunked extra MiB':>17}")  # fmt: skip
    per_row = []
    for m in (int(r) for r in args.rows):
        u, c = results.get(("unchunked", m)), results.get(("chunked", m))
        if not (u and c):
            print(f"{m:>9} | (failed)")
            continue
        per_row.append((m, u["extra"], u["state"]))
        print(f"{m:>9.0e} | {c['state'] / mib:>9.1f} | {u['ms']:>12.1f} | {c['ms']:>10.1f} | {u['ms'] / c['ms']:>7.2f}x | "
              f"{u['extra'] / mib:>19.1f} | {c['extra'] / mib:>17.1f}")  # fmt: skip
    if per_row:
        m, extra, state = per_row[-1]
        bytes_per_row = (state + extra) / m
        print(f"unchunked: {bytes_per_row:.0f} bytes per row (state + step working set at M={m:.0e}) -> "
              f"out of memory at M ~ {args.ram_gib * 2**30 / bytes_per_row:.2e} rows with {args.ram_gib:g} GiB; "
              f"chunked: state {state / m:.0f} bytes per row + O(batch x chunk)")  # fmt: skip


if __name__ == "__main__":
    main()

"""π-net state layout: peak memory of a growth run and step time, blocks vs the former amortised buffer.

Setup of BENCHMARKS.md: infinite PiMLP r=100 with one infinite hidden layer and the readout (``depth: 2`` in manynets =
``pilimit_lib`` depth 1; state 118.6 MiB at M = 1e5 in fp32, the official 119 MiB), batch 8, CIFAR-sized inputs.
Layouts of the A/B state (same kernel, same chunks, bit-identical results):

- ``blocks``: manynets, A/B in blocks of ``--block`` rows; an append fills the last block or allocates a new one;
- ``amortised``: the layout before blocks, reimplemented here by :class:`AmortisedPiLayer`: A/B each in one tensor
  over-allocated by 1.5x, reallocated and copied whenever it is full;
- ``unchunked`` (step time only): the straightforward formulation, one (batch x M) matrix per layer, autograd through
  it for the input gradient and ``torch.cat`` to append rows (what a direct port of the formulas does).

Memory: each (layout, M) runs in a fresh subprocess that grows every infinite layer from r to M rows by batches of 8
(π-SGD's append of every step; the last two are full training steps - forward, backward, π-SGD - for the kernel's
working set at the largest M) and reads VmHWM from /proc/self/status. "peak - grown state" is VmHWM minus
the RSS before growing minus the state added: what the run held beyond its state (target at 1e5 rows: < 50 MiB).
Pages of a buffer's unused tail are never touched, so the amortised layout's cost is the copy when it grows (old and
new buffer at once): besides each M the table has the M just after the amortised layout's last reallocation below
it, its worst case.
Step time: one subprocess per M builds the three variants on the same state and interleaves their training steps
(forward, backward, π-SGD append) in rotating order; medians over ``--steps`` steps, ratios from the same process.
Official numbers (GPU): 6 / 21 / 165 ms per step at 1e3 / 1e4 / 1e5.
Usage: ``python benchmarks/pinet.py [--rows 1e3 1e4 1e5] [--grow-rows 1e5 1e6] [--steps 5] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import torch

from manynets.cuda_ops.pi_kernel import pi_forward_reference
from manynets.layers.pi import GROWTH, InfPiLayer
from manynets.layers.pi_optim import PiSGD
from manynets.networks import PiMLP

MIB = 2**20


class AmortisedPiLayer(InfPiLayer):
    """The former layout, for comparison: A/B each one tensor (a single "block") over-allocated by ``GROWTH``,
    reallocated and copied whenever an append does not fit."""

    def _allocate(self, m: int) -> None:
        capacity = self._blocks["A"][0].shape[0] if self._blocks["A"] else 0
        if m <= capacity:
            return
        capacity = max(m, int(capacity * GROWTH))
        for name, width in (("A", self.r_out), ("B", self.r_in)):
            grown = torch.empty(capacity, width, dtype=self.state_dtype, device=self.Amult.device)
            if self._blocks[name]:
                grown[: self._rows].copy_(self._blocks[name][0][: self._rows])
            self._blocks[name][:] = [grown]  # the old tensor is freed before the next one is allocated
        self.block_size = capacity


def amortised(net: PiMLP) -> PiMLP:
    """``net`` with its infinite layers switched to the former layout (A/B concatenated into one tensor each)."""
    for layer in net.layers()[1:]:
        state = {name: layer.state_tensor(name) for name in ("A", "B")}
        layer.__class__ = AmortisedPiLayer
        layer._blocks, layer.block_size = {name: [t] for name, t in state.items()}, layer.num_rows
    return net


def build(layout: str, chunk: int, block: int) -> PiMLP:
    net = PiMLP(10, (3, 32, 32), r=100, depth=2, chunk_size=chunk, block_size=block, seed=0)
    return amortised(net) if layout == "amortised" else net


def optimizer(net: PiMLP) -> PiSGD:
    return PiSGD([p for p in net.parameters() if p.requires_grad] + [l.Amult for l in net.layers()[1:]], lr=0.01,
                 weight_decay=1e-4)  # fmt: skip


def train_step(net: PiMLP, opt: PiSGD, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


# -- memory: one growth run per process ------------------------------------------------------------------------
def grow_case(layout: str, m: int, chunk: int, block: int, batch: int) -> dict:
    torch.manual_seed(0)
    net = build(layout, chunk, block)
    opt = optimizer(net)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    train_step(net, opt, x, y)  # warm-up: thread pools, allocator
    layers = net.layers()[1:]
    rows = {id(l): (torch.randn(batch, l.r_out) * 0.01, torch.nn.functional.normalize(torch.randn(batch, l.r_in)))
            for l in layers}  # fmt: skip
    base, state0, t0 = _status_bytes("VmRSS"), net.state_bytes(), time.perf_counter()
    while net.head.num_rows + 2 * batch < m:
        for layer in layers:  # PiSGD's append, with the rows of a fixed fake gradient (its in-place decay of Amult,
            layer.append_rows(*rows[id(layer)], -0.01)  # O(M) a step, is left out: it holds no memory)
    while net.head.num_rows < m:  # full steps at the end: the kernel's working set at the largest M
        train_step(net, opt, x, y)
    state = net.state_bytes()
    return {"layout": layout, "rows": net.head.num_rows, "state": state, "added": state - state0,
            "peak": _status_bytes("VmHWM"), "base": base, "seconds": time.perf_counter() - t0}  # fmt: skip


# -- step time: the variants interleaved in one process ----------------------------------------------------------
def _fill(net: PiMLP, m: int) -> None:
    """Every infinite layer at m rows of random state (A ~ N(0, 0.01^2), unit B rows, Amult -0.01)."""
    gen = torch.Generator().manual_seed(0)
    for layer in net.layers()[1:]:
        layer.resize_rows(m)
        for a, b in zip(layer.state_blocks("A"), layer.state_blocks("B")):
            a.normal_(0, 0.01, generator=gen)
            b.copy_(torch.nn.functional.normalize(torch.randn(b.shape, generator=gen)))
        layer.Amult.data.fill_(-0.01)


def _naive_step(net: PiMLP, state: dict, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    """One step of the straightforward formulation on ``state`` = {layer: [A, B, Amult]} (whole tensors)."""
    g = net.stem(x)
    saved = []
    for layer in net.layers()[1:]:
        A, B, Amult = state[layer]
        s = g.norm(dim=1)
        gbar = g / s[:, None]
        out = pi_forward_reference(gbar, s, A, B, Amult)
        out.retain_grad()
        saved.append((layer, out, s, gbar))
        g = out + layer.bias_alpha * layer.bias
    torch.nn.functional.cross_entropy(net.head.alpha * g, y).backward()
    with torch.no_grad():
        for layer, out, s, gbar in saved:
            A, B, Amult = state[layer]
            state[layer] = [torch.cat([A, out.grad * s[:, None]]), torch.cat([B, gbar.detach()]),
                            torch.cat([Amult, torch.full((len(s),), -lr)])]  # fmt: skip
        for p in net.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def time_case(m: int, steps: int, chunk: int, block: int, batch: int) -> dict:
    torch.manual_seed(0)
    blocks = build("blocks", chunk, block)
    _fill(blocks, m)
    nets = {"blocks": blocks, "amortised": amortised(copy.deepcopy(blocks)), "unchunked": copy.deepcopy(blocks)}
    opts = {k: optimizer(v) for k, v in nets.items() if k != "unchunked"}
    naive = {l: [l.state_tensor(n) for n in ("A", "B", "Amult")] for l in nets["unchunked"].layers()[1:]}
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = {k: [] for k in nets}
    names = list(nets)
    for step in range(steps + 1):  # the first round warms up; the order rotates so no variant always follows another
        for name in names[step % 3 :] + names[: step % 3]:
            net, t0 = nets[name], time.perf_counter()
            if name == "unchunked":
                _naive_step(net, naive, x, y, 0.01)
            else:
                train_step(net, opts[name], x, y)
            if step:
                times[name].append(time.perf_counter() - t0)
    return {"rows": m, "state": blocks.state_bytes(), **{k: 1000 * statistics.median(v) for k, v in times.items()}}


def last_reallocation(m: int, r: int = 100, batch: int = 8) -> int:
    """M right after the amortised buffer's last reallocation on the way from r to m rows (its worst case:
    the old and the new buffer held at once, at a state as large as it gets before m)."""
    rows = capacity = last = r
    while rows + batch <= m:
        if rows + batch > capacity:
            capacity, last = max(rows + batch, int(capacity * GROWTH)), rows + batch
        rows += batch
    return last


FAILURES: list[str] = []
"""Cases whose subprocess failed (the benchmark then exits with status 1)."""


def _subprocess(args: argparse.Namespace, *case: str) -> dict | None:
    cmd = [sys.executable, __file__, "--case", *case, "--steps", str(args.steps), "--chunk", str(args.chunk),
           "--block", str(args.block), "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{' '.join(case)}: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        FAILURES.append(" ".join(case))
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="*", default=[1e3, 1e4, 1e5], help="M of the step-time table")
    parser.add_argument("--grow-rows", type=float, nargs="*", default=[1e5, 1e6], help="M of the growth runs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--chunk", type=int, default=16384, help="rows per chunk (the library default)")
    parser.add_argument("--block", type=int, default=16384, help="rows per block (the library default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP barrier costs on a shared box)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        if args.case[0] == "grow":
            result = grow_case(args.case[1], int(float(args.case[2])), args.chunk, args.block, args.batch)
        else:
            result = time_case(int(float(args.case[1])), args.steps, args.chunk, args.block, args.batch)
        print(json.dumps(result))
        return
    print(f"PiMLP r=100 depth 2 (lib depth 1), batch {args.batch}, chunk {args.chunk}, block {args.block}, "
          f"{args.threads} thread(s)")  # fmt: skip
    if args.grow_rows:
        print("\ngrowth run r -> M rows (fresh process per run; MiB; peak = VmHWM):")
        print(f"{'M rows':>9} | {'state':>8} | {'layout':>9} | {'peak - RSS before':>17} | {'peak - grown state':>18} | "
              f"{'run s':>6}")  # fmt: skip
        targets = [int(m) for m in args.grow_rows]
        targets += [last_reallocation(m, batch=args.batch) + 2 * args.batch for m in targets]
        for m in sorted(targets):
            for layout in ("amortised", "blocks"):
                r = _subprocess(args, "grow", layout, str(m))
                if r:
                    held = r["peak"] - r["base"]
                    print(f"{r['rows']:>9.1e} | {r['state'] / MIB:>8.1f} | {layout:>9} | {held / MIB:>17.1f} | "
                          f"{(held - r['added']) / MIB:>18.1f} | {r['seconds']:>6.1f}")  # fmt: skip
    if args.rows:
        print(f"\nstep time at M rows (forward, backward, π-SGD append; median of {args.steps}, interleaved, ms):")
        print(f"{'M rows':>9} | {'state MiB':>9} | {'unchunked':>9} | {'amortised':>9} | {'blocks':>7} | "
              f"{'blocks / amortised':>18} | {'unchunked / blocks':>18}")  # fmt: skip
        for m in args.rows:
            r = _subprocess(args, "time", str(m))
            if r:
                print(f"{r['rows']:>9.0e} | {r['state'] / MIB:>9.1f} | {r['unchunked']:>9.1f} | {r['amortised']:>9.1f} | "
                      f"{r['blocks']:>7.1f} | {r['blocks'] / r['amortised']:>17.3f}x | "
                      f"{r['unchunked'] / r['blocks']:>17.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
    if FAILURES:
        sys.exit(f"failed cases: {', '.join(FAILURES)}")

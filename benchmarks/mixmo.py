"""MixMo training-step cost against the plain backbone at the same per-step batch, in one process.

For each setting the table gives the median time of a full training step (forward, loss, backward,
SGD step) of the plain backbone on B images and of MixMoModule on B / b unique images repeated b
times on the device (B samples per member), their ratio (median of alternating step pairs; BENCHMARKS.md target <= 1.02x for
WRN-16-4, M = 2, CutMix p 0.5, b = 2, batch 32), and the share of the MixMo step spent in batch
formation and mask building (``MixMoModule.mixmo_inputs``: repetition indices, gathers, Dirichlet
ratios, CutMix/mixup masks, weights, targets; goal <= 3 %). Timings alternate between the two models
to cancel drift on a shared machine.

    python benchmarks/mixmo.py                       # CPU, the two default settings
    python benchmarks/mixmo.py --device cuda --depth 28 --width 10 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from manynets.lightning_modules import MixMoModule
from manynets.networks import WideResNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench(depth: int, width: int, batch: int, reps: int, msda: str | None, l2_reg: float, device: torch.device,
          steps: int, rounds: int) -> dict[str, float]:  # fmt: skip
    backbone = partial(WideResNet, depth=depth, width=width, stride_on="conv2", strided_conv_padding="tf", init="mixmo")
    plain = backbone(100, (3, 32, 32)).to(device)
    mixmo = MixMoModule(
        backbone, num_classes=100, image_shape=(3, 32, 32), num_members=2, cutmix_prob=0.5,
        batch_repetitions=reps, msda=msda, l2_reg=l2_reg,
    ).to(device)  # fmt: skip
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_mixmo = torch.optim.SGD(mixmo.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=0.0 if l2_reg else 5e-4)  # fmt: skip
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    unique = batch // reps
    xu, yu = x[:unique].contiguous(), y[:unique].contiguous()

    def plain_step() -> None:
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()

    def mixmo_step() -> None:
        opt_mixmo.zero_grad(set_to_none=True)
        mixmo.training_loss(xu, yu)[0].backward()
        opt_mixmo.step()

    def formation() -> None:
        for _ in range(steps):
            mixmo.mixmo_inputs(xu, yu)

    for _ in range(2):
        plain_step(), mixmo_step()
    # alternate single steps and take the median of the per-pair ratios: on a shared machine the
    # load drifts between pairs much more than within one
    t_plain, t_mixmo, ratios = [], [], []
    for _ in range(rounds):
        a = _timed(lambda: [plain_step() for _ in range(steps)], device) / steps
        b = _timed(lambda: [mixmo_step() for _ in range(steps)], device) / steps
        t_plain.append(a), t_mixmo.append(b), ratios.append(b / a)
    t_form = [_timed(formation, device) / steps for _ in range(rounds)]
    p, m, f = statistics.median(t_plain), statistics.median(t_mixmo), statistics.median(t_form)
    return {"plain_ms": 1e3 * p, "mixmo_ms": 1e3 * m, "ratio": statistics.median(ratios), "formation_share": f / m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=None, help="one custom setting instead of the defaults")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.depth is not None:
        settings = [(args.depth, args.width, args.batch, args.reps, None, 0.0)]
    else:
        settings = [
            (16, 4, 32, 2, None, 0.0),  # BENCHMARKS.md: WRN-16-4, M=2, CutMix p 0.5, b=2, batch 32
            (16, 4, 64, 4, None, 0.0),  # Cut-MixMo M=2, b=4 (the paper's b), batch 64
            (16, 4, 64, 4, "cutmix", 3e-4),  # + CutMix MSDA and the explicit l2_reg term (CIFAR recipe)
        ]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = f"| {'setting':<44} | {'plain ms':>8} | {'MixMo ms':>8} | {'ratio':>6} | {'formation':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for depth, width, batch, reps, msda, l2 in settings:
        r = bench(depth, width, batch, reps, msda, l2, device, args.steps, args.rounds)
        name = f"WRN-{depth}-{width} B={batch} M=2 b={reps} p=0.5" + (f" +{msda} l2" if msda else "")
        print(f"| {name:<44} | {r['plain_ms']:8.1f} | {r['mixmo_ms']:8.1f} | {r['ratio']:6.3f} | "
              f"{100 * r['formation_share']:8.2f}% |")  # fmt: skip


if __name__ == "__main__":
    main()

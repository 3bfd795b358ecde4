"""The fast path per method: eager float32 against channels_last, bf16 autocast and ``torch.compile``, one run.

What is timed: one training step of each method's module (forward of the method's training objective,
``training_loss``; probes: the frozen backbone's forward and every probe's loss), backward and an SGD step,
on random images (B, 3, S, S). Every variant is its own copy of the same weights: ``eager`` (float32,
contiguous), ``channels_last`` (``model.init_args.channels_last: true``), ``bf16`` (autocast, what
``trainer.precision: bf16-mixed`` does), ``bf16+cl`` (both), ``compile`` (``model.init_args.compile: true``,
float32) and ``compile+bf16+cl`` (all three); compilation times are printed apart. Steps of the variants
alternate, round after round, so a shared machine's drift hits all alike; the table gives each variant's
median ms per step and its ratio to ``eager`` (< 1 is faster), measured in the same run.

    python benchmarks/fast_path.py                                  # CPU, every method
    python benchmarks/fast_path.py --methods classifier --no-compile --rounds 3
    python benchmarks/fast_path.py --device cuda --batch 128        # GPU (gpu_check.sh)

bf16 on a CPU is fast only with native bf16 instructions (AVX512-BF16 or AMX); the header says whether
this CPU has them. The superposition step at n = N binds with the HRR op, which computes in float32
under autocast (``manynets.cuda_ops.binding``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from functools import partial

import torch

from manynets.lightning_modules import ClassifierModule, MixMoModule, ProbeModule, SubspaceModule, SuperpositionModule
from manynets.networks import WideResNet

VARIANTS = {  # name -> (channels_last, bf16, compile)
    "eager": (False, False, False),
    "channels_last": (True, False, False),
    "bf16": (False, True, False),
    "bf16+cl": (True, True, False),
    "compile": (False, False, True),
    "compile+bf16+cl": (True, True, True),
}


def build(method: str, backbone, shape, **fast):
    if method == "classifier":
        return ClassifierModule(backbone, 10, shape, **fast)
    if method == "superposition":
        return SuperpositionModule(backbone, 10, shape, capacity=2, **fast)
    if method == "mixmo":
        return MixMoModule(backbone, 10, shape, num_members=2, batch_repetitions=2, **fast)
    if method == "subspaces":
        return SubspaceModule(backbone, 10, shape, kind="line", **fast)
    if method == "probe":
        return ProbeModule(backbone=backbone, num_classes=10, image_shape=shape, **fast)
    raise ValueError(method)


def loss_of(module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(module, ProbeModule):
        module.predict_logits(images)  # the frozen backbone fills the layer taps
        l2 = 1.0 / len(images)
        return sum(module.probes[n].loss(z, labels, l2) for n, z in module._probe_logits().items())
    return module.training_loss(images, labels)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module, images, labels, bf16: bool, device: torch.device):
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(module, images, labels)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    return step


def bench(method: str, args, device: torch.device, variants: list[str]) -> list[tuple[str, float, float]]:
    backbone = partial(WideResNet, depth=args.depth, width=args.width)
    shape = (3, args.size, args.size)
    torch.manual_seed(0)
    state = build(method, backbone, shape).state_dict()
    images = torch.randn(args.batch, *shape, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    steps, compile_s = {}, {}
    for name in variants:
        channels_last, bf16, compiled = VARIANTS[name]
        torch.manual_seed(0)
        module = build(method, backbone, shape, channels_last=channels_last, compile=compiled)
        module.load_state_dict(copy.deepcopy(state))
        module.configure_model()
        module.to(device).train()
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        steps[name] = make_step(module, x, labels, bf16, device)
        start = time.perf_counter()
        for _ in range(args.warmup):  # compile happens here
            steps[name]()
        compile_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(min(steps[name]() for _ in range(args.steps)))
    base = statistics.median(times["eager"])
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        rows.append((name, median * 1e3, median / base))
        if "compile" in name:
            print(f"  {method} {name}: compilation and {args.warmup} warm-up steps took {compile_s[name]:.1f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["classifier", "superposition", "mixmo", "subspaces", "probe"])
    parser.add_argument("--depth", type=int, default=16, help="WideResNet depth")
    parser.add_argument("--width", type=int, default=2, help="WideResNet width factor")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the variants")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant and round (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation included)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile variants (each costs ~1 min per method on a CPU)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if not (args.no_compile and "compile" in v) and not (args.no_bf16 and "bf16" in v)]
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.cpu._is_avx512_bf16_supported()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"fast path: {name}; WRN-{args.depth}-{args.width}, batch {args.batch}, {args.size} px; timed: one "
          f"training step (forward, loss, backward, SGD); median of {args.rounds} rounds of min-of-{args.steps}; "
          f"native bf16: {native}; torch {torch.__version__}")
    print(f"{'method':14s} {'variant':14s} {'ms/step':>9s} {'vs eager':>9s}")
    for method in args.methods:
        for variant, ms, ratio in bench(method, args, device, variants):
            print(f"{method:14s} {variant:14s} {ms:9.1f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()

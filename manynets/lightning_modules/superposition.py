"""Computation in superposition: MIMOConv (Menet et al., "MIMONets: Multiple-Input-Multiple-Output
Neural Networks Exploiting Computation in Superposition", NeurIPS 2023; spec §1).

Forward pass at the backbone seams (spec §1.1), for a call superposing n | N images:

1. training truncates the batch to B' = B - (B mod n) (as the official code; a shuffled loader drops a
   different remainder every epoch); evaluation instead completes a last partial group with copies of
   the batch's first images and discards their outputs, so every image of the set is scored once
   (:func:`pad_to_groups` says why copies and not zeros); ``stem`` on every image;
2. groups of n consecutive images, repeated r = N/n times over the N slots (slot j holds image
   j mod n), each slot bound with its key and the slots summed (:mod:`manynets.layers.binding`);
3. ``body`` and ``pool`` once per group, i.e. on B'/n superposed maps (the speed-up);
4. learned unbinding into N feature vectors, the r copies of each image averaged; ``head``.

Evaluation on a CPU (no gradients, no autocast; MIMONet's conv-BN-ReLU stem) computes steps 1-2 in
chunks of :data:`STEM_CHUNK_IMAGES` images (one thread; else one chunk): the stem as one GEMM over image patches with its BN folded
(:class:`manynets.layers.conv_gemm.ConvBNReLU`; the library's 3-input-channel convolution runs at a
fraction of the GEMM rate), each chunk bound by one GEMM over its stacked slots while in cache. Only
the stem and binding grow with n at a fixed body batch; this keeps their cost per image near the GEMM
rate (``benchmarks/superposition.py`` prints the per-part times). Training, GPUs and other stems take
the module path, numerically the same up to float32 rounding.

The stem output may be maps (B, C, H, W) or vectors (B, C) (MLP backbones): binding acts on the
channel axis either way (HRR: circular convolution of the C channels; MBAT: a C x C matrix per slot).

Training (spec §1.4): mixup (one lambda ~ Beta(alpha, alpha) per batch, random partner) on the
pre-superposition batch; loss = mixup CE + bind_weight·R_bind + isometry_weight·R_iso. In dynamic
mode a batch superposes ``sup_low`` images with probability 1 - ``sup_frequency``, else N.

Evaluation at every n in ``eval_n`` (default: every divisor of N): :meth:`SuperpositionModule.evaluation_logits`
returns the variants ``n{n}`` and ``""`` (= n = N, computed once), which the base class logs as
``val/n{n}/{acc,nll,ece,brier}``, ``test/n{n}/...`` and ``val/...``, ``test/...``; plus
``test/n{n}/images_per_s`` (forward time of the network only, measured in the test loop, with CUDA
synchronisation).
Evaluation batches superpose consecutive images of the (unshuffled) loader; the official evaluation
shuffles, so its partners are random: either way each image is evaluated with other test images.
The official evaluation also truncates every batch to a multiple of n, dropping up to n - 1 images
per batch; here every image is scored (metrics and ``images_per_s`` count the real images only; the
time includes the padded group).

Epochs: MIMOConv counts one epoch as N passes over the data with a batch of 128·N images (so about
390 steps per epoch for every N). The configs keep Lightning's epoch (one pass) and state the paper's
epochs as ``trainer.max_epochs = paper_epochs x N``, with ``check_val_every_n_epoch: N`` and the
GradientFilter's ``window_epochs: N`` so validation and the filter's averaging follow paper epochs.

Official-code differences (documented in the configs too):
- R_iso is added to the loss instead of a separate backward pass with its own clip at 1e3; the
  gradients are the same unless R_iso's gradient alone exceeds norm 1e3.
- The intended leaky-ReLU Kaiming init of the ISO convs (dead code officially, spec §1.10) is the
  backbone's ``init_slope`` option; the Table 1 configs use it for MIMONet (0.5).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from manynets.errors import check_arg
from manynets.layers.binding import (
    HRRBinding,
    LearnedUnbinding,
    MBATBinding,
    SumBinding,
    check_slots,
)
from manynets.layers.conv_gemm import ConvBNReLU
from manynets.layers.isometry import isometry_regularization
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule
from manynets.networks import isometry_convs


def mixup(images: Tensor, labels: Tensor, alpha: float, generator: torch.Generator | None = None):
    """Mixup (Zhang et al., ICLR 2018): ``lam·x + (1 - lam)·x[perm]`` with one lam ~ Beta(alpha, alpha).

    Returns (mixed images, labels, partner labels, lam); alpha = 0 returns the batch unchanged (lam 1).
    """
    if alpha <= 0:
        return images, labels, labels, 1.0
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = float(beta.sample())
    perm = torch.randperm(images.shape[0], device=images.device, generator=generator)
    return lam * images + (1 - lam) * images[perm], labels, labels[perm], lam


def pad_to_groups(images: Tensor, n: int) -> Tensor:
    """``images`` (B, ...) followed by copies of the batch's first images, up to a multiple of n rows.

    Evaluation pads a batch's last partial group this way and discards the padded rows' outputs, so
    each image is scored exactly once. **Copies of real images, not zeros**, because a superposed
    image's prediction depends on its partners: the official evaluation (spec §1.4) superposes each
    image with other test images (random ones: its loader shuffles), and a copy of another image of
    the batch is just such a partner, so the last group's real images are predicted as in any full
    group. A zero (data-mean) image is a partner never seen in training: its stem output is one
    constant map, bound and summed into the group, which changes the real images' predictions in a
    way no test partner would. With B >= n the copies are of the first group's images, all distinct
    from the partial group's. Only a batch with fewer than n images (``eval_batch_size`` < n, or a
    set's last batch) cycles through itself, so an image may be superposed with copies of itself:
    it then fills more slots, like a smaller n (no other image interferes); the official code drops
    such a batch. Eval batch sizes that are multiples of N avoid it except for
    the set's last batch.
    """
    missing = -images.shape[0] % n
    if missing == 0:
        return images
    copies = torch.arange(missing, device=images.device) % images.shape[0]
    return torch.cat([images, images[copies]])


STEM_CHUNK_IMAGES = 16
"""Images per chunk of the single-threaded evaluation stem and binding on a CPU: one chunk's stem output
(16 x 64 x 32 x 32 floats = 4 MiB for MIMONet) stays in cache until it is bound. With several threads
the whole batch is one chunk: every op of a chunk is a parallel region whose threads wait for each
other, which cost more than the cache gain on a 2-core machine shared with other processes (measured
with ``benchmarks/superposition.py``)."""


def _hooked(module: nn.Module) -> bool:
    """Whether a hook watches ``module`` or a submodule (an analysis tap, e.g. Saturation): the fused
    stem would bypass it, so the module path runs instead."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class SuperpositionModule(ClassifierModule):
    """MIMOConv: N images bound with keys after ``stem``, one ``body`` pass, learned unbinding before ``head``.

    Args:
        capacity: N, the number of slots (``num`` of the official script).
        binding: ``hrr`` (circular convolution with a key per slot), ``mbat`` (matrix per slot) or
            ``none`` (plain sum; with N = 1 binding and unbinding are both the identity, the plain
            backbone).
        trainable_keys: False freezes the keys / MBAT matrices (official ``-v``).
        mixup_alpha: Beta(alpha, alpha) of mixup on the pre-superposition batch; 0 disables it.
        bind_weight: beta_b of R_bind (HRR only; official ``-j`` 0.1).
        isometry_weight: beta_o of R_iso over ``isometry_convs(backbone)`` (official ``-o`` 1e-4 for
            WideISO*/MIMONet; 0 for WideResNet).
        sup_low: images superposed in the low-demand batches of dynamic training (must divide N);
            None = N (static).
        sup_frequency: fraction of training batches superposing N images (the rest: ``sup_low``).
        eval_n: the n evaluated in validation and test (each must divide N); None = every divisor.
        backbone: backbone class and options, a :class:`manynets.networks.Backbone` (e.g. ``{class_path:
            WideResNet, init_args: {depth: 28, width: 10}}``): binding after its ``stem``, unbinding before
            its ``head``.
    """

    PAPER = "Menet et al., NeurIPS 2023 (MIMONets: MIMOConv)"

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = torch.optim.SGD,
        capacity: int = 1,
        binding: Literal["none", "hrr", "mbat"] = "hrr",
        trainable_keys: bool = True,
        mixup_alpha: float = 1.0,
        bind_weight: float = 0.1,
        isometry_weight: float = 0.0,
        sup_low: int | None = None,
        sup_frequency: float = 1.0,
        eval_n: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        m = "model.init_args."
        check_arg(capacity >= 1, m + "capacity", capacity, "the number of slots N >= 1")
        check_arg(binding in ("none", "hrr", "mbat"), m + "binding", binding, "'none', 'hrr' or 'mbat'")
        check_arg(0.0 <= sup_frequency <= 1.0, m + "sup_frequency", sup_frequency, "a fraction in [0, 1]",
                  "A fraction of the batches: 0.5, not 50.")
        check_arg(sup_low is None or (sup_low >= 1 and capacity % sup_low == 0), m + "sup_low", sup_low,
                  f"a divisor of {m}capacity = {capacity}", f"Use one of {divisors(capacity)}, or null (static).")
        bad = [n for n in eval_n or [] if n < 1 or capacity % n]
        check_arg(not bad, m + "eval_n", eval_n, f"divisors of {m}capacity = {capacity}",
                  f"{bad} do not divide it; use values from {divisors(capacity)}.")
        check_arg(mixup_alpha >= 0, m + "mixup_alpha", mixup_alpha, ">= 0", "0 disables mixup.")
        check_arg(bind_weight >= 0, m + "bind_weight", bind_weight, ">= 0", "0.1 in MIMOConv; 0 turns R_bind off.")
        check_arg(isometry_weight >= 0, m + "isometry_weight", isometry_weight, ">= 0", "1e-4 for MIMONet; 0 is off.")
        super().__init__(backbone, num_classes, image_shape, optimizer, **kwargs)
        self.capacity = capacity
        self.sup_low, self.sup_frequency = sup_low or capacity, sup_frequency
        self.mixup_alpha, self.bind_weight, self.isometry_weight = mixup_alpha, bind_weight, isometry_weight
        self.eval_n = sorted(set(eval_n or divisors(capacity)) | {capacity})
        channels, dim = int(self.network.stem_channels), int(self.network.feature_dim)
        if binding == "none":
            self.binding: nn.Module = SumBinding(capacity, channels)
        elif binding == "hrr":
            self.binding = HRRBinding(capacity, channels, trainable_keys)
        else:
            self.binding = MBATBinding(capacity, channels, trainable_keys)
        self.unbinding = None if (binding == "none" and capacity == 1) else LearnedUnbinding(dim, capacity)
        self._throughput: dict[int, list[float]] = {}  # n -> [images, seconds] of the test forward passes

    def compiled_modules(self) -> list[nn.Module]:
        """``compile: true`` compiles the backbone's stem, body and head, which :meth:`forward_superposed`
        calls around the binding (the backbone itself when N = 1 without binding)."""
        if self.unbinding is None:
            return [self.network]
        return [self.network.stem, self.network.body, self.network.head]

    # -- the superposed forward pass -----------------------------------------------
    def forward_superposed(self, images: Tensor, n: int | None = None, pad: bool = False) -> Tensor:
        """Logits of a batch of B images, n per superposition (default N), groups of consecutive images.

        ``pad=False`` (training, the official behaviour): logits (B', C) of the first
        B' = B - (B mod n) images; the remainder is dropped. ``pad=True`` (evaluation): logits (B, C)
        of every image; a last partial group is completed by :func:`pad_to_groups`, whose rows are
        discarded.
        """
        n = self.capacity if n is None else n
        check_slots(n, self.capacity)
        batch = images.shape[0]
        if pad:
            images = pad_to_groups(images, n)
        kept = images.shape[0] - images.shape[0] % n
        if kept == 0:
            raise ValueError(f"A batch of {images.shape[0]} images holds no full superposition of n={n}; "
                             f"use a batch size that is a multiple of {n}.")
        if self.unbinding is None:  # N = 1 without binding: the plain backbone
            return self.network(images[:kept])
        stem = self._eval_stem_gemm(images)
        if stem is not None:
            x = self._stem_and_bind_in_chunks(images[:kept], n, stem)
        else:
            x = self.network.stem(images[:kept])
            x = self.binding(x.view(kept // n, n, *x.shape[1:]))
        features = self.network.pool(self.network.body(x))
        logits = self.network.head(self.unbinding(features, n))
        return logits[:batch] if pad else logits

    def _eval_stem_gemm(self, images: Tensor) -> ConvBNReLU | None:
        """The stem as one GEMM with its BN folded (:class:`~manynets.layers.conv_gemm.ConvBNReLU`) where
        that path applies: evaluation without gradients or autocast, on a CPU, and a conv[-BN][-ReLU] stem
        (MIMONet's); else None (the stem module on the whole batch)."""
        if (self.training or torch.is_grad_enabled() or images.device.type != "cpu" or images.dim() != 4
                or torch.is_autocast_enabled("cpu") or _hooked(self.network.stem)):
            return None
        return ConvBNReLU.match(self.network.stem)

    def _stem_and_bind_in_chunks(self, images: Tensor, n: int, stem: ConvBNReLU) -> Tensor:
        """The body's input (B/n, C, H, W): stem and binding of :data:`STEM_CHUNK_IMAGES` images at a time
        (single-threaded; with more threads the whole batch at once).

        Each chunk's stem output (n slots of a group stored one after the other) is bound and bundled by
        one GEMM (:meth:`~manynets.layers.binding._Binding.bind_stacked`) into its rows of the output while
        it is still in cache, so the stem output of the whole batch (n times the body's input) is never
        written to memory. Equal to ``binding(stem(images).view(...))`` in evaluation.
        """
        groups = images.shape[0] // n
        per = max(1, STEM_CHUNK_IMAGES // n) if torch.get_num_threads() == 1 else groups  # groups per chunk
        out = None
        for start in range(0, groups, per):
            y = stem(images[start * n:(start + per) * n])
            if out is None:
                maps = y.shape[1:]
                out = y.new_empty(groups, maps[0], maps[1] * maps[2])
            self.binding.bind_stacked(y.view(-1, n * maps[0], maps[1] * maps[2]), n, out=out[start:start + per])
        out = out.view(groups, *maps)
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)  # the body's layout (``channels_last``)
        return out

    def forward(self, images: Tensor) -> Tensor:
        """Evaluation logits (B, C) at n = N, every image (padded groups, see :func:`pad_to_groups`)."""
        return self.forward_superposed(images, self.capacity, pad=True)

    def predict_logits(self, images: Tensor) -> Tensor:
        return self.forward_superposed(images, self.capacity, pad=True)

    # -- training ------------------------------------------------------------------
    def sample_n(self) -> int:
        """n of the next training batch: ``sup_low`` with probability 1 - sup_frequency, else N."""
        if self.sup_low != self.capacity and torch.rand(()).item() >= self.sup_frequency:
            return self.sup_low
        return self.capacity

    def regularization(self) -> tuple[Tensor, Tensor]:
        """(R_bind, R_iso) of the current parameters."""
        r_bind = self.binding.regularization()
        r_iso = (isometry_regularization(isometry_convs(self.network)) if self.isometry_weight
                 else r_bind.new_zeros(()))
        return r_bind, r_iso

    def training_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixup CE of the first B - (B mod n) images + bind_weight·R_bind + isometry_weight·R_iso;
        returns (loss, logits, the kept images' labels)."""
        n = self.sample_n()
        mixed, y_a, y_b, lam = mixup(images, labels, self.mixup_alpha)
        logits = self.forward_superposed(mixed, n)  # the first B - (B mod n) images (official truncation)
        kept = logits.shape[0]
        ls = self.hparams.label_smoothing
        loss = lam * F.cross_entropy(logits, y_a[:kept], label_smoothing=ls)
        if lam < 1:
            loss = loss + (1 - lam) * F.cross_entropy(logits, y_b[:kept], label_smoothing=ls)
        r_bind, r_iso = self.regularization()
        if self.bind_weight and isinstance(self.binding, HRRBinding):
            loss = loss + self.bind_weight * r_bind
        if self.isometry_weight:
            loss = loss + self.isometry_weight * r_iso.to(loss.dtype)
        self.log_dict({"train/r_bind": r_bind.detach().float(), "train/r_iso": r_iso.detach().float(),
                       "train/n": float(n)}, on_step=True, on_epoch=False)
        return loss, logits, labels[:kept]

    # -- evaluation at every n -----------------------------------------------------
    def evaluation_logits(self, images: Tensor) -> dict[str, Tensor]:
        """``{"": n = N, "n{n}": ...}`` for every n in ``eval_n``, each (B, C) for every image (padded groups).

        n = N is computed once and serves both ``""`` and ``n{N}``. While testing, each n's forward pass
        is timed for ``test/n{n}/images_per_s``.
        """
        timed = self._trainer is not None and self.trainer.testing
        variants = {}
        for n in self.eval_n:
            forward = self._timed_forward if timed else functools.partial(self.forward_superposed, pad=True)
            variants[f"n{n}"] = forward(images, n)
        variants[""] = variants[f"n{self.capacity}"]
        return variants

    def on_test_start(self) -> None:
        super().on_test_start()
        self._throughput = {n: [0.0, 0.0] for n in self.eval_n}

    def _timed_forward(self, images: Tensor, n: int) -> Tensor:
        sync = images.is_cuda
        if sync:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        logits = self.forward_superposed(images, n, pad=True)
        if sync:
            torch.cuda.synchronize(images.device)
        self._throughput[n][0] += logits.shape[0]
        self._throughput[n][1] += time.perf_counter() - start
        return logits

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        for n, (count, seconds) in self._throughput.items():
            if seconds > 0:
                self.log(f"test/n{n}/images_per_s", count / seconds)

"""The fast path of every method: ``channels_last``, ``bf16-mixed`` and ``compile`` (issue 14, item 2).

Each training method takes one Lightning step on the bundled digits twice from the same weights, batch and
random draws: float32 (``32-true``) and ``bf16-mixed`` + ``channels_last``. The losses agree within
:data:`LOSS_RTOL`, every 4-D weight is stored channels-last, the first convolution receives a channels-last
batch, and a validation batch under bf16 + channels_last gives finite metrics (the evaluation paths). The
compiled steps (slow) check that every method's compiled modules trace without a graph break and that
compiling leaves the state-dict keys alone; the HRR binding op compiles with ``fullgraph=True`` under
autocast and computes in float32 there. The π-net refuses 16-bit precisions (:class:`PiNetModule`).
"""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from manynets import networks
from manynets.cuda_ops.binding import hrr_bind_bundle
from manynets.datamodules.digits import DigitsDataModule
from manynets.errors import ConfigError
from manynets.layers.pi_optim import PiSGD
from manynets.lightning_modules import (
    ClassifierModule,
    MixMoModule,
    PiNetModule,
    ProbeModule,
    SubspaceModule,
    SuperpositionModule,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 8
SHAPE = (3, SIDE, SIDE)
BACKBONE = functools.partial(networks.WideResNet, depth=10, width=1)

LOSS_RTOL = 2e-3
"""Relative tolerance of the bf16-mixed loss against the float32 loss of the same step (same weights, batch and
random draws): half of bf16's unit roundoff u = 2^-8. Autocast rounds the inputs and weights of every
convolution and Linear to bf16 (relative error <= u each) and accumulates in float32; the cross-entropy runs in
float32. At initialisation the logits are O(1) and the batch mean averages the per-image errors, so the loss
moves by a small fraction of u: measured <= 5e-4 relative on these five methods (a 4x margin). For scale, other
draws of a method's randomness move the float32 loss by 1.4e-2 (superposition's mixup) and 1.9e-2 (MixMo's
masks)."""

METHODS = {
    "classifier": lambda **fast: ClassifierModule(BACKBONE, 10, SHAPE, **fast),
    "superposition": lambda **fast: SuperpositionModule(BACKBONE, 10, SHAPE, capacity=2, **fast),
    "mixmo": lambda **fast: MixMoModule(BACKBONE, 10, SHAPE, num_members=2, batch_repetitions=2, **fast),
    "subspaces": lambda **fast: SubspaceModule(BACKBONE, 10, SHAPE, kind="line", **fast),
    "probe": lambda **fast: ProbeModule(backbone=BACKBONE, num_classes=10, image_shape=SHAPE, **fast),
}
"""Method -> builder(channels_last=..., compile=...) at tiny settings (probes on a fresh backbone)."""

STEPS = {"probe": 2}
"""Steps per run: the probes start at zero weights, so their first loss is K log C whatever the features;
the second step's loss depends on them."""


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a root directory (the probes' CSV and figure) write into the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return DigitsDataModule(size=SIDE, channels=3, batch_size=16, eval_batch_size=16, augment=False)


def _trainer(precision: str, steps: int, val_batches: int = 0) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, limit_val_batches=val_batches, precision=precision, accelerator="cpu",
                      devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip


def _loss(trainer: pl.Trainer) -> float:
    metrics = trainer.callback_metrics
    return metrics["train/probe_loss" if "train/probe_loss" in metrics else "train/loss"].item()


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _fit_once(method: str, state: dict, digits, precision: str, **fast) -> tuple[float, nn.Module, list[bool]]:
    """One run of ``STEPS`` from ``state``: (last loss, module, channels-last flag of each input of the first conv)."""
    torch.manual_seed(0)
    module = METHODS[method](**fast)
    module.load_state_dict(state)
    seen: list[bool] = []
    conv = _first_conv(module.stems[0] if method == "mixmo" else module.network)
    conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    torch.manual_seed(1)  # the same batch order and the same method draws (mixup, masks, points) in both runs
    trainer = _trainer(precision, STEPS.get(method, 1))
    trainer.fit(module, datamodule=digits)
    return _loss(trainer), module, seen


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_channels_last_step_matches_float32(method, digits):
    torch.manual_seed(0)
    state = METHODS[method]().state_dict()
    reference, plain, plain_seen = _fit_once(method, state, digits, "32-true")
    loss, module, seen = _fit_once(method, state, digits, "bf16-mixed", channels_last=True)
    assert math.isfinite(loss) and abs(loss - reference) <= LOSS_RTOL * abs(reference), (loss, reference)
    weights = [p for p in module.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not _first_conv(plain).weight.is_contiguous(memory_format=torch.channels_last)  # the option did it
    assert seen and all(seen), "the first convolution got a batch that is not channels-last"
    assert not any(plain_seen)
    metrics = _trainer("bf16-mixed", 1, val_batches=1).validate(module, datamodule=digits, verbose=False)[0]
    assert all(math.isfinite(v) for v in metrics.values()) and 0.0 <= metrics["val/acc"] <= 1.0


def test_channels_last_keeps_the_model(digits):
    """channels_last is a layout: the same logits in float32, and state dicts load either way."""
    torch.manual_seed(0)
    plain = ClassifierModule(BACKBONE, 10, SHAPE).eval()
    fast = ClassifierModule(BACKBONE, 10, SHAPE, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    images = torch.randn(4, *SHAPE)
    (batch, _) = fast.on_after_batch_transfer((images, torch.zeros(4, dtype=torch.long)), 0)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(batch), plain(images), rtol=1e-5, atol=1e-5)
    plain.load_state_dict(fast.state_dict())


@pytest.mark.parametrize("method", list(METHODS))
def test_compile_keeps_state_dict_keys(method):
    """``compile: true`` compiles in place: the same state-dict keys, so checkpoints load either way."""
    torch.manual_seed(0)
    plain, compiled = METHODS[method](), METHODS[method](compile=True)
    compiled.configure_model()
    compiled.configure_model()  # idempotent: Lightning calls it at every fit/validate/test
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())
    assert compiled.compiled_modules() and all(m._compiled_call_impl is not None for m in compiled.compiled_modules())


def test_pinet_refuses_16bit_precision(digits):
    backbone = functools.partial(networks.PiMLP, r=4, depth=2, width=0, seed=0)
    module = PiNetModule(backbone, 10, SHAPE, optimizer=functools.partial(PiSGD, lr=0.1))
    with pytest.raises(ConfigError, match="trainer.precision"):
        _trainer("bf16-mixed", 1).fit(module, datamodule=digits)


@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_binding_op_computes_in_float32_under_autocast(method):
    """Under autocast the op casts to float32: its output and gradients equal the float32 op's on the same
    (bf16-valued) inputs; without the rule its GEMM would run in bf16 (relative error ~ 2^-8)."""
    x = torch.randn(3, 2, 64, 4, 4).bfloat16()
    keys = torch.randn(2, 64)
    x32 = x.float().requires_grad_()
    keys32 = keys.clone().requires_grad_()
    reference = hrr_bind_bundle(x32, keys32, method)
    reference.square().sum().backward()
    xb, kb = x.clone().requires_grad_(), keys.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hrr_bind_bundle(xb, kb, method)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    torch.testing.assert_close(xb.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)  # x.grad is bf16 (x's dtype)
    torch.testing.assert_close(kb.grad, keys32.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_binding_op_compiles_without_graph_break():
    """``fullgraph=True`` fails on any graph break; the op is one node with its fake and autograd rules."""
    torch._dynamo.reset()
    x = torch.randn(2, 2, 16, 4, 4, requires_grad=True)
    keys = torch.randn(2, 16, requires_grad=True)
    compiled = torch.compile(hrr_bind_bundle, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, keys)
    assert out.dtype == torch.float32
    out.sum().backward()
    expected = hrr_bind_bundle(x.detach(), keys.detach())
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and keys.grad is not None


@pytest.mark.slow
def test_compiled_step_of_every_method(digits, monkeypatch):
    """One bf16-mixed + channels_last step of every method with ``compile: true``, each compiled module traced
    with ``fullgraph=True`` (a graph break fails) by the cheap ``aot_eager`` backend (dynamo capture and AOT
    autograd, the parts that break; inductor's code generation would cost a minute per method here)."""
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self: compile_module(self, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    for method in METHODS:
        torch.manual_seed(0)
        state = METHODS[method]().state_dict()
        reference, _, _ = _fit_once(method, state, digits, "bf16-mixed", channels_last=True)
        loss, module, _ = _fit_once(method, state, digits, "bf16-mixed", channels_last=True, compile=True)
        assert abs(loss - reference) <= LOSS_RTOL * abs(reference), (method, loss, reference)
        assert list(module.state_dict()) == list(METHODS[method]().state_dict())


@pytest.mark.slow
def test_inductor_compiled_classifier_step(digits):
    """The real ``compile: true`` path (inductor) with bf16-mixed and channels_last, once, on the classifier:
    the loss of the float32 eager step within :data:`LOSS_RTOL`."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    state = METHODS["classifier"]().state_dict()
    reference, _, _ = _fit_once("classifier", state, digits, "32-true")
    loss, module, seen = _fit_once("classifier", state, digits, "bf16-mixed", channels_last=True, compile=True)
    assert abs(loss - reference) <= LOSS_RTOL * abs(reference), (loss, reference)
    assert module.network._compiled_call_impl is not None

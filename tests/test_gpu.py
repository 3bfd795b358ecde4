"""CUDA checks (``pytest -m gpu``; run by ``benchmarks/gpu_check.sh``; skipped without CUDA).

- every custom op of :mod:`manynets.cuda_ops` on CUDA against its CPU reference: the HRR bind-and-bundle
  op (both formulations, forward and backward, and under bf16 autocast) and the π kernel (chunked forward
  and backward, on one tensor and on row blocks, through the registered ops too, also with a bf16 state);
- one ``bf16-mixed`` + ``channels_last`` training step of every method on CUDA against the float32 step
  (the tolerance of ``tests/test_fast_path.py``), and one compiled (inductor) step;
- on-device data (``data.init_args.on_device``) feeding a CUDA run: batches made on the GPU, evaluation
  batches equal to the DataLoader path's (to 1 ulp: CUDA may divide by a scalar as a reciprocal multiply).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch

from manynets.cuda_ops.binding import hrr_bind_bundle
from manynets.cuda_ops.pi_kernel import (
    pi_backward,
    pi_backward_op,
    pi_forward,
    pi_forward_op,
    pi_forward_reference,
)
from manynets.datamodules.base import ImageDataModule
from manynets.datamodules.digits import DigitsDataModule
from test_fast_path import LOSS_RTOL, METHODS, SIDE, STEPS, _loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a root directory (the probes' CSV and figure) write into the test's own folder."""
    monkeypatch.chdir(tmp_path)


# -- custom ops against their CPU references ----------------------------------------------------
@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("shape", [(4, 2, 64, 8, 8), (4, 4, 256, 4, 4), (6, 2, 64)], ids=["c64", "c256", "vectors"])
def test_binding_op_on_cuda_matches_cpu(method, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    keys = torch.randn(shape[1], shape[2], dtype=torch.float64)
    grad = torch.randn(shape[0], *shape[2:], dtype=torch.float64)

    def run(device: str) -> tuple[torch.Tensor, ...]:
        xd, kd = x.to(device).float().requires_grad_(), keys.to(device).float().requires_grad_()
        out = hrr_bind_bundle(xd, kd, method)
        out.backward(grad.to(device).float())
        return out.detach().cpu(), xd.grad.cpu(), kd.grad.cpu()

    for on_cpu, on_cuda in zip(run("cpu"), run("cuda")):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_binding_op_in_float32_under_cuda_autocast(method):
    """cuFFT has no bf16: under autocast the op casts to float32 (its output is float32 and equals the
    float32 op on the same bf16-valued inputs)."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 64, 8, 8, device=CUDA).bfloat16()
    keys = torch.randn(2, 64, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = hrr_bind_bundle(x, keys, method)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hrr_bind_bundle(x.float(), keys, method), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_pi_kernel_on_cuda_matches_cpu_reference(state_dtype):
    """Chunked forward and backward on CUDA (also through the registered ops) against the unchunked CPU
    formula in float64 and its autograd gradient w.r.t. g = s gbar."""
    torch.manual_seed(0)
    b, r, r_out, m = 8, 16, 10, 5000
    g = torch.randn(b, r, dtype=torch.float64)
    B = torch.randn(m, r, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    A, Amult = torch.randn(m, r_out, dtype=torch.float64), torch.rand(m, dtype=torch.float64)
    delta = torch.randn(b, r_out, dtype=torch.float64)
    A, B = A.to(state_dtype).double(), B.to(state_dtype).double()  # the values a low-precision state holds
    gg = g.clone().requires_grad_()
    s = gg.norm(dim=1)
    reference = pi_forward_reference(gg / s[:, None], s, A, B, Amult)
    (reference * delta).sum().backward()
    s, gbar = g.norm(dim=1), g / g.norm(dim=1, keepdim=True)
    cuda = [t.to(CUDA, torch.float32) for t in (gbar, s, delta, Amult)]
    gbar_c, s_c, delta_c, amult_c = cuda
    A_c, B_c = A.to(CUDA, state_dtype), B.to(CUDA, state_dtype)
    blocks = [list(t.split(1500)) for t in (A_c, B_c, amult_c)]  # the state as row blocks, as a π-layer keeps it
    for forward, backward, state in ((pi_forward, pi_backward, (A_c, B_c, amult_c)),
                                     (pi_forward, pi_backward, blocks), (pi_forward_op, pi_backward_op, blocks)):
        out = forward(gbar_c, s_c, *state, 1024)
        grad = backward(delta_c, gbar_c, *state, 1024)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu().double(), reference.detach(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(grad.cpu().double(), gg.grad, rtol=1e-4, atol=1e-3)


# -- a bf16 step of every method -----------------------------------------------------------------
def _cuda_step(method: str, state: dict, precision: str, **fast) -> float:
    torch.manual_seed(0)
    module = METHODS[method](**fast)
    module.load_state_dict(state)
    torch.manual_seed(1)
    trainer = pl.Trainer(max_steps=STEPS.get(method, 1), limit_val_batches=0, precision=precision,
                         accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule(size=SIDE, channels=3, batch_size=16, augment=False))
    if fast.get("channels_last"):
        weights = [p for p in module.parameters() if p.dim() == 4]
        assert all(p.is_cuda and p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    return _loss(trainer)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_channels_last_step_on_cuda(method):
    torch.manual_seed(0)
    state = METHODS[method]().state_dict()
    reference = _cuda_step(method, state, "32-true")
    loss = _cuda_step(method, state, "bf16-mixed", channels_last=True)
    assert abs(loss - reference) <= LOSS_RTOL * abs(reference), (loss, reference)


def test_compiled_bf16_step_on_cuda():
    """The whole fast path on CUDA (inductor + bf16-mixed + channels_last), on the classifier."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    state = METHODS["classifier"]().state_dict()
    reference = _cuda_step("classifier", state, "32-true")
    loss = _cuda_step("classifier", state, "bf16-mixed", channels_last=True, compile=True)
    assert abs(loss - reference) <= LOSS_RTOL * abs(reference), (loss, reference)


# -- on-device data ------------------------------------------------------------------------------
class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append((batch[0].device.type, batch[0].dtype))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append((batch[0].clone(), batch[1].clone()))


def test_on_device_data_feeds_cuda():
    if "on_device" not in inspect.signature(ImageDataModule.__init__).parameters:
        pytest.skip("data.init_args.on_device does not exist yet")
    records = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        recorder = _Recorder()
        data = DigitsDataModule(size=SIDE, channels=3, batch_size=16, eval_batch_size=32, augment=True,
                                on_device=on_device)  # fmt: skip
        trainer = pl.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=0,
                             accelerator="gpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[recorder])  # fmt: skip
        trainer.fit(METHODS["classifier"](), datamodule=data)
        records[on_device] = recorder
    assert records[True].train == [("cuda", torch.float32)] * 3
    assert len(records[True].val) == len(records[False].val) == 2
    for (x_dev, y_dev), (x_ref, y_ref) in zip(records[True].val, records[False].val):
        assert x_dev.is_cuda and torch.equal(y_dev, y_ref)
        # the same images; CUDA may divide by a scalar as a multiply by its reciprocal (1 ulp)
        torch.testing.assert_close(x_dev, x_ref, rtol=1e-6, atol=1e-6)

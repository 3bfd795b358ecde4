"""GradientFilter: skips exactly the flagged steps, the LR still advances, always clips (spec §1.4, 1.9.7)."""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manynets.callbacks import GradientFilter
from manynets.lightning_modules import ClassifierModule
from manynets.networks import Backbone


class Flat(Backbone):
    def __init__(self, num_classes, image_shape):
        super().__init__()
        self.stem = nn.Flatten()
        self.body = nn.Linear(4, 4)
        self.pool = nn.Identity()
        self.head = nn.Linear(4, num_classes)
        self.feature_dim = self.stem_channels = 4

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class Spiky(ClassifierModule):
    """Multiplies the loss of chosen global steps by a factor (a huge one, or NaN)."""

    def __init__(self, spikes: dict[int, float]) -> None:
        super().__init__(Flat, num_classes=2, image_shape=(1, 2, 2),
                         optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
                         lr_scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 1.0 / (1 + s)),
                         scheduler_interval="step")  # fmt: skip
        self.spikes = spikes

    def training_loss(self, images, labels):
        loss, logits, targets = super().training_loss(images, labels)
        return loss * self.spikes.get(self.global_step, 1.0), logits, targets


def grad_norm(module) -> float | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


class Record(pl.Callback):
    """Records the pre-clip norm (placed before the filter) and, via :class:`After`, the state after it."""

    def __init__(self) -> None:
        self.pre_norms, self.post_norms, self.changed, self.lrs = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre_norms.append(grad_norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))


class After(pl.Callback):
    def __init__(self, record: Record) -> None:
        self.record = record

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.record.post_norms.append(grad_norm(pl_module))
        self.record.before = [p.detach().clone() for p in pl_module.parameters()]
        self.record.lrs.append(optimizer.param_groups[0]["lr"])


def fit(module, callbacks, epochs, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 2, 2), torch.randint(0, 2, (16,)))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


def test_skips_exactly_the_outlier_step_and_the_lr_still_advances(tmp_path):
    record = Record()
    flt = GradientFilter(ratio=10.0, max_norm=1e3, window_epochs=2)
    # epoch 0-1 = window 0 (no threshold yet: a x1e3 spike in epoch 1 passes); step 9 (epoch 2) is flagged
    trainer = fit(Spiky({5: 1e3, 9: 1e6}), [record, flt, After(record)], 3, tmp_path)
    assert flt.skipped_per_epoch == [0, 0, 1]
    assert record.changed == [True] * 9 + [False] + [True] * 2
    assert record.post_norms[9] is None  # gradients dropped, so the optimiser skips every parameter
    assert record.lrs == pytest.approx([0.1 / (1 + s) for s in range(12)])  # the schedule advanced through step 9
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 13)
    window = record.pre_norms[:8]  # accepted norms of epochs 0-1, the spike of step 5 included
    assert flt.mean_prev == pytest.approx(sum(window) / 8, rel=1e-6)
    assert record.pre_norms[9] >= 10 * flt.mean_prev > max(record.pre_norms[8], *record.pre_norms[10:])


def test_always_clips_to_max_norm(tmp_path):
    record = Record()
    flt = GradientFilter(ratio=1e9, max_norm=1e-3)
    fit(Spiky({}), [record, flt, After(record)], 1, tmp_path)
    assert all(pre > 1e-3 for pre in record.pre_norms)
    assert all(post == pytest.approx(1e-3, rel=1e-4) for post in record.post_norms)
    assert flt.skipped_per_epoch == [0]


def test_nonfinite_loss_is_skipped_instead_of_raising(tmp_path):
    record = Record()
    flt = GradientFilter()
    module = Spiky({2: math.nan})
    fit(module, [record, flt, After(record)], 1, tmp_path)
    assert flt.skipped_per_epoch == [1] and record.changed == [True, True, False, True]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_state_round_trip_and_bad_arguments():
    flt = GradientFilter(window_epochs=3)
    flt.mean_prev, flt._sum, flt._count, flt.skipped_per_epoch = 2.5, 7.0, 3, [0, 2]
    other = GradientFilter(window_epochs=3)
    other.load_state_dict(flt.state_dict())
    assert other.state_dict() == flt.state_dict()
    with pytest.raises(ValueError, match=r"GradientFilter\]\.init_args\.window_epochs = 0"):
        GradientFilter(window_epochs=0)
    assert GradientFilter.handles_nonfinite_loss


def _diverging_fit(tmp_path, module, flt, epochs=2):
    """Fit with RunCheckpoint (last + per-epoch) so the kept checkpoints can be inspected."""
    from manynets.callbacks import RunCheckpoint

    ckpt = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, enable_version_counter=False)
    data = TensorDataset(torch.randn(16, 1, 2, 2), torch.randint(0, 2, (16,)))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[flt, ckpt], default_root_dir=tmp_path)  # fmt: skip
    return trainer, lambda: trainer.fit(module, DataLoader(data, batch_size=4))


def test_a_whole_skipped_epoch_stops_the_run_and_keeps_the_finite_checkpoint(tmp_path):
    from manynets.errors import NonFiniteError

    # epoch 0 trains normally (steps 0-3); every step of epoch 1 has a NaN loss and is skipped
    flt = GradientFilter(max_consecutive_skips=100)
    trainer, run = _diverging_fit(tmp_path, Spiky({s: math.nan for s in range(4, 8)}), flt)
    with pytest.raises(NonFiniteError, match="every one of the epoch's 4 steps was skipped.*last.ckpt"):
        run()
    kept = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert kept["epoch"] == 0 and kept["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_consecutive_skips_stop_the_run(tmp_path):
    from manynets.errors import NonFiniteError

    flt = GradientFilter(max_consecutive_skips=3)
    trainer, run = _diverging_fit(tmp_path, Spiky({s: math.nan for s in range(5, 100)}), flt, epochs=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps were skipped"):
        run()
    assert trainer.global_step == 7  # steps 5, 6, 7 skipped (the optimizer step counter still advances)


def test_non_finite_parameters_stop_the_run_and_are_never_checkpointed(tmp_path):
    from manynets.errors import NonFiniteError

    class Overflow(Spiky):
        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 6:  # finite gradients, but the weights overflow (lr 1e6 style)
                with torch.no_grad():
                    self.network.head.weight.fill_(float("inf"))

    flt = GradientFilter(ratio=1e12)
    trainer, run = _diverging_fit(tmp_path, Overflow({}), flt)
    with pytest.raises(NonFiniteError, match="weights became non-finite.*network.head.weight"):
        run()
    kept = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_run_checkpoint_refuses_to_write_non_finite_weights(tmp_path):
    from manynets.errors import NonFiniteError

    class Poisoned(Spiky):
        def on_train_epoch_end(self):
            if self.current_epoch == 1:
                with torch.no_grad():
                    self.network.body.bias.fill_(float("nan"))

    trainer, run = _diverging_fit(tmp_path, Poisoned({}), GradientFilter())
    with pytest.raises(NonFiniteError, match=r"network.body.bias.*was not written.*last.ckpt"):
        run()
    kept = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert kept["epoch"] == 0

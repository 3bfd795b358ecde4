"""Skip optimiser steps with outlier gradients (MIMOConv's filter, spec §1.4 steps 3-6); any method.

Per optimiser step, on the gradient that is about to be applied:

1. g = the pre-clip global L2 norm of all gradients; the gradients are clipped to ``max_norm``
   (always, ``clip_grad_norm_``).
2. The step is **skipped** when g is not finite or ``g >= ratio * mean_prev``, where ``mean_prev``
   is the mean g over the *accepted* steps of the previous window (``window_epochs`` trainer epochs;
   infinite during the first window, so only non-finite norms are skipped there).
3. A skipped step leaves parameters and optimiser state untouched (its gradients are set to None,
   which every PyTorch optimiser skips), but the learning-rate scheduler still advances, as in the
   official loop (``scheduler.step()`` runs for every batch).

Lightning calls ``on_before_optimizer_step`` after the backward pass, so under DDP the gradients are
already all-reduced (every rank computes the same g and decides alike) and with fp16 AMP they are
already unscaled by the precision plugin (so g and the clipping are in true units; the GradScaler
still sees its inf checks). With model-sharded strategies (FSDP) each rank holds a shard and the
norm here would be local: not supported.

Official-code difference (spec §1.10): the official check ``total_grad_norm.isfinite`` lacks the
call parentheses, so it is always true; the paper intends to drop non-finite steps, which this does
explicitly (the official comparison happened to reject NaN and inf too). The callback sets
``handles_nonfinite_loss = True``, so :class:`~manynets.lightning_modules.ClassifierModule` does not
raise on a NaN/inf loss; its gradients are non-finite and the step is skipped.

Divergence is never hidden: the run stops with :class:`~manynets.errors.NonFiniteError` when a whole
training epoch was skipped, when ``max_consecutive_skips`` steps in a row were skipped, or when any
parameter or buffer (BN statistics) became non-finite after a step (checked once per step on the
max-abs of every tensor, one fused reduction). The checkpoints already written are kept, and
:class:`~manynets.callbacks.RunCheckpoint` never writes non-finite weights.

Logged: ``train/grad_norm`` (pre-clip, per step) and ``train/skipped_steps`` (per epoch).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from manynets.callbacks.run_checkpoint import nonfinite_weights
from manynets.errors import NonFiniteError, check_arg


class GradientFilter(pl.Callback):
    """Skip steps whose gradient norm is non-finite or >= ``ratio`` x the previous window's mean.

    Args:
        ratio: G, the outlier threshold relative to the mean accepted norm (MIMOConv ``-g``: 10).
        max_norm: every gradient is clipped to this global norm (MIMOConv: 1e3).
        window_epochs: trainer epochs per averaging window. MIMOConv's epoch is N passes over the
            data; its configs run N trainer epochs per paper epoch and set this to N.
        max_consecutive_skips: stop the run when this many steps in a row were skipped (a diverged
            run skips every step); a whole skipped epoch stops it too.
    """

    handles_nonfinite_loss = True

    def __init__(
        self, ratio: float = 10.0, max_norm: float = 1000.0, window_epochs: int = 1, max_consecutive_skips: int = 50
    ) -> None:
        super().__init__()
        name = "trainer.callbacks[GradientFilter].init_args."
        check_arg(ratio > 0, name + "ratio", ratio, "> 0 (a step is skipped when its norm >= ratio x the mean)")
        check_arg(max_norm > 0, name + "max_norm", max_norm, "> 0 (the global clipping norm)")
        check_arg(window_epochs >= 1, name + "window_epochs", window_epochs, "an integer >= 1")
        check_arg(max_consecutive_skips >= 1, name + "max_consecutive_skips", max_consecutive_skips, "an integer >= 1")
        self.ratio, self.max_norm, self.window_epochs = float(ratio), float(max_norm), int(window_epochs)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.consecutive_skips = 0
        self.steps_this_epoch = 0
        self.mean_prev = math.inf
        self._sum, self._count = 0.0, 0
        self._epochs_in_window = 0
        self.skipped_this_epoch = 0
        self.skipped_per_epoch: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.skipped_this_epoch = 0
        self.steps_this_epoch = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, error_if_nonfinite=False)
        g = float(norm)
        self.steps_this_epoch += 1
        if not math.isfinite(g) or g >= self.ratio * self.mean_prev:
            self.skipped_this_epoch += 1
            self.consecutive_skips += 1
            optimizer.zero_grad(set_to_none=True)
            if self.consecutive_skips >= self.max_consecutive_skips:
                self._stop(trainer, f"{self.consecutive_skips} consecutive steps were skipped (last norm {g:.3g})")
        else:
            self.consecutive_skips = 0
            self._sum += g
            self._count += 1
        pl_module.log("train/grad_norm", g, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        bad = nonfinite_weights(pl_module)
        if bad:
            self._stop(trainer, f"weights became non-finite after the step ({', '.join(bad[:3])})")

    def _stop(self, trainer: pl.Trainer, what: str) -> None:
        kept = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"Training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: {what}. "
            f"GradientFilter stops the run instead of training on; the last finite checkpoint is kept ({kept}). "
            "Lower the learning rate or raise trainer.callbacks[GradientFilter].init_args.ratio, then resume "
            "from that checkpoint with --ckpt_path."
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps_this_epoch and self.skipped_this_epoch == self.steps_this_epoch:
            self._stop(trainer, f"every one of the epoch's {self.steps_this_epoch} steps was skipped")
        self.skipped_per_epoch.append(self.skipped_this_epoch)
        pl_module.log("train/skipped_steps", float(self.skipped_this_epoch), on_step=False, on_epoch=True)
        self._epochs_in_window += 1
        if self._epochs_in_window >= self.window_epochs:
            if self._count:
                self.mean_prev = self._sum / self._count
            self._sum, self._count, self._epochs_in_window = 0.0, 0, 0

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mean_prev": self.mean_prev, "sum": self._sum, "count": self._count,
            "epochs_in_window": self._epochs_in_window, "skipped_per_epoch": list(self.skipped_per_epoch),
            "skipped_this_epoch": self.skipped_this_epoch, "steps_this_epoch": self.steps_this_epoch,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mean_prev = float(state_dict["mean_prev"])
        self._sum, self._count = float(state_dict["sum"]), int(state_dict["count"])
        self._epochs_in_window = int(state_dict["epochs_in_window"])
        self.skipped_per_epoch = list(state_dict["skipped_per_epoch"])
        self.skipped_this_epoch = int(state_dict.get("skipped_this_epoch", 0))
        self.steps_this_epoch = int(state_dict.get("steps_this_epoch", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))

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

Logged: ``train/grad_norm`` (pre-clip, per step) and ``train/skipped_steps`` (per epoch).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch


class GradientFilter(pl.Callback):
    """Skip steps whose gradient norm is non-finite or >= ``ratio`` x the previous window's mean.

    Args:
        ratio: G, the outlier threshold relative to the mean accepted norm (MIMOConv ``-g``: 10).
        max_norm: every gradient is clipped to this global norm (MIMOConv: 1e3).
        window_epochs: trainer epochs per averaging window. MIMOConv's epoch is N passes over the
            data; its configs run N trainer epochs per paper epoch and set this to N.
    """

    handles_nonfinite_loss = True

    def __init__(self, ratio: float = 10.0, max_norm: float = 1000.0, window_epochs: int = 1) -> None:
        super().__init__()
        if ratio <= 0 or max_norm <= 0 or window_epochs < 1:
            raise ValueError(
                f"GradientFilter(ratio={ratio}, max_norm={max_norm}, window_epochs={window_epochs}): "
                "expected ratio > 0, max_norm > 0 and window_epochs >= 1."
            )
        self.ratio, self.max_norm, self.window_epochs = float(ratio), float(max_norm), int(window_epochs)
        self.mean_prev = math.inf
        self._sum, self._count = 0.0, 0
        self._epochs_in_window = 0
        self.skipped_this_epoch = 0
        self.skipped_per_epoch: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.skipped_this_epoch = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, error_if_nonfinite=False)
        g = float(norm)
        if not math.isfinite(g) or g >= self.ratio * self.mean_prev:
            self.skipped_this_epoch += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            self._sum += g
            self._count += 1
        pl_module.log("train/grad_norm", g, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mean_prev = float(state_dict["mean_prev"])
        self._sum, self._count = float(state_dict["sum"]), int(state_dict["count"])
        self._epochs_in_window = int(state_dict["epochs_in_window"])
        self.skipped_per_epoch = list(state_dict["skipped_per_epoch"])

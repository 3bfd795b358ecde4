"""Lightning's ModelCheckpoint, with ``last.ckpt`` always the newest state and never non-finite weights.

Since lightning 2.6, ``save_last=True`` rewrites ``last.ckpt`` only when a top-k checkpoint is written
at the same step, so with a monitored metric that stops improving ``last.ckpt`` falls behind the run.
:class:`RunCheckpoint` keeps the top-k logic (best by ``val/acc`` in manynets' CLI) as it is and also
rewrites ``last.ckpt``, when it is not already the current state:

- at the end of every training epoch;
- at the end of every validation that does not end an epoch (``val_check_interval < 1``,
  ``check_val_every_n_epoch > 1``);
- every ``every_n_train_steps`` optimizer steps, when that is set;
- at the end of training (a run stopped by ``max_steps`` or early stopping mid-epoch).

Before any file is written the weights and buffers are checked: a checkpoint with NaN/inf weights is
never written (:class:`~manynets.errors.NonFiniteError` stops the run and names the last finite
checkpoint, which is kept). The manynets CLI sets ``enable_version_counter: false``, so a run never
writes ``last-v1.ckpt`` beside ``last.ckpt``; the CLI refuses to start a new run in a checkpoint
directory that already holds checkpoints instead.
"""

from __future__ import annotations

from itertools import chain

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from manynets.errors import NonFiniteError


def nonfinite_weights(module: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN/inf (one fused max-abs reduction)."""
    named = [(n, t.detach()) for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    peaks = torch.stack([m.float() for m in torch._foreach_norm([t for _, t in named], float("inf"))])
    if bool(torch.isfinite(peaks).all()):
        return []
    return [n for (n, _), ok in zip(named, torch.isfinite(peaks).tolist()) if not ok]


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` follows the run step by step (see the module docstring)."""

    _last_saved_at: tuple[int, str] | None = None
    _hook: str = ""
    _last_written: str = ""

    # -- when ---------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._hook = "step"
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0:
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hook = "validation"
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hook = "epoch_end"
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, same_hook=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hook = "train_end"
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer, same_hook: bool = False) -> None:
        """Rewrite last.ckpt unless it already holds this step (and, with ``same_hook``, this hook's state)."""
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        saved = self._last_saved_at
        if saved is not None and saved[0] == trainer.global_step and (not same_hook or saved[1] == self._hook):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_at = (trainer.global_step, self._hook)

    # -- what -----------------------------------------------------------------------
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        bad = nonfinite_weights(trainer.lightning_module)
        if bad:
            kept = self._last_written or "none written yet"
            raise NonFiniteError(
                f"Training diverged: {len(bad)} weight tensors hold NaN/inf at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step} (e.g. {', '.join(bad[:3])}), so '{filepath}' was not written. "
                f"The last finite checkpoint written is kept: {kept}. Lower the learning rate or clip "
                "gradients (trainer.gradient_clip_val, or the manynets.callbacks.GradientFilter callback), then "
                "resume from it with --ckpt_path."
            )
        super()._save_checkpoint(trainer, filepath)
        self._last_written = filepath

"""A callback for the DDP-equals-one-device test: per-step loss averaged over ranks, and the final weights.

Writes to ``out_dir`` (rank 0 only):

- ``steps.json``: for each optimizer step, the learning rate it used, the batch loss of every
  rank and their mean (with equal per-rank batches the mean of the per-rank means is the mean
  over the whole batch), and a fingerprint of the images of the global batch (the sorted
  per-image pixel sums and the labels of all ranks), so that a data-order difference between
  runs shows as such rather than as a loss difference; plus the scheduler's ``total_steps``.
- ``weights.pt``: the module's ``state_dict`` (parameters and BN buffers) after the last step.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch


class RecordSteps(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict] = []
        self.total_steps: int | None = None
        self._lr: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        configs = trainer.lr_scheduler_configs
        self.total_steps = getattr(configs[0].scheduler, "total_steps", None) if configs else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lr = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, labels = batch
        loss = outputs["loss"].detach().double() if isinstance(outputs, dict) else outputs.detach().double()
        # collectives: every rank calls them, in the same order
        losses = trainer.strategy.all_gather(loss).reshape(-1)
        sums = trainer.strategy.all_gather(images.detach().double().flatten(1).sum(1)).reshape(-1)
        all_labels = trainer.strategy.all_gather(labels).reshape(-1)
        self.steps.append(
            {
                "global_step": int(trainer.global_step),
                "lr": self._lr,
                "rank_losses": losses.tolist(),
                "loss": float(losses.mean()),
                "image_sums": sorted(round(v, 6) for v in sums.tolist()),
                "labels": sorted(all_labels.tolist()),
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.out_dir, "weights.pt"))
        with open(os.path.join(self.out_dir, "steps.json"), "w") as f:
            json.dump({"world_size": trainer.world_size, "total_steps": self.total_steps, "steps": self.steps}, f)

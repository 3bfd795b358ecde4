"""A callback for the DDP test: each rank writes the sample indices of its training shard."""

import json
import os

import lightning.pytorch as pl


class RecordShard(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        indices = [int(i) for i in iter(sampler)]
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json")
        with open(path, "w") as f:
            json.dump({"world_size": trainer.world_size, "sampler": type(sampler).__name__, "indices": indices}, f)

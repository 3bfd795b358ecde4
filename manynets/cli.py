"""The ``manynets`` command: Lightning's CLI over our modules and data modules.

``manynets fit --config configs/quickstart/digits.yaml`` then
``manynets test --config configs/quickstart/digits.yaml --ckpt_path <ckpt>``.
Subcommands ``fit / validate / test / predict``; ``--config`` repeats; ``--print_config``.
``model`` and ``data`` take any subclass of :class:`ClassifierModule` / :class:`ImageDataModule`
by class path (short names work for the classes manynets ships). ``data.num_classes`` and
``data.image_shape`` are linked into the model. A ``checkpoint`` group configures
ModelCheckpoint (last + best by ``val/acc`` by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import manynets.callbacks  # noqa: F401  (short class names in configs)
import manynets.datamodules  # noqa: F401
import manynets.lightning_modules  # noqa: F401
import manynets.networks  # noqa: F401
from manynets.datamodules.base import DataError, ImageDataModule
from manynets.lightning_modules.classifier import CheckpointMismatchError, ClassifierModule

_PROGRESS_BARS = ("RichProgressBar", "TQDMProgressBar")


class ManynetsCLI(LightningCLI):
    """LightningCLI with manynets defaults: seed 0, linked data shapes, checkpointing, LR monitor."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", ClassifierModule)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"prog": "manynets"})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Check --ckpt_path before Lightning restores the model's hyper-parameters from it."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise CheckpointMismatchError(
                f"--ckpt_path '{ckpt_path}' is not a file. Give the path of a .ckpt written by "
                "`manynets fit` (see checkpoint.dirpath, by default <log_dir>/checkpoints/)."
            )
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            except Exception as err:
                raise CheckpointMismatchError(
                    f"--ckpt_path '{ckpt_path}' cannot be read as a Lightning checkpoint ({err}). "
                    "It may be truncated or not a checkpoint; use a .ckpt written by `manynets fit`."
                ) from err
            saved = ckpt.get("hyper_parameters", {}).get("_class_path")
            wanted = self.config[sub].model.get("class_path")
            if saved and wanted and saved.rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1]:
                raise CheckpointMismatchError(
                    f"--ckpt_path '{ckpt_path}' was saved by {saved}, but the config builds {wanted}. "
                    "Use the config the checkpoint was trained with (config.yaml in its log directory)."
                )
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Add a rich progress bar and a learning-rate monitor unless disabled or already there."""
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        callbacks = list(trainer.callbacks or [])
        names = {str(getattr(c, "class_path", "")).rsplit(".", 1)[-1] for c in callbacks}
        if trainer.enable_progress_bar is not False and not names.intersection(_PROGRESS_BARS):
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar", init_args=Namespace()))
        if trainer.logger is not False and "LearningRateMonitor" not in names:
            callbacks.append(
                Namespace(class_path="lightning.pytorch.callbacks.LearningRateMonitor", init_args=Namespace())
            )
        trainer.callbacks = callbacks


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``manynets`` console script and ``python -m manynets``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["grid"]:  # `manynets grid --config grid.yaml`: see manynets/grid.py
        from manynets.grid import main as grid_main

        raise SystemExit(grid_main(argv[1:]))
    try:
        ManynetsCLI(args=args)
    except (DataError, CheckpointMismatchError) as err:
        print(f"manynets: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

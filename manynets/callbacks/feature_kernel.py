"""Feature-kernel transfer evaluation of a π-net after every epoch (spec pinet_saturation §1.8).

The paper's ImageNet32 -> CIFAR-10 protocol: train the π-net on 250 random ImageNet 32x32 classes,
after each epoch fit kernel ridge regression on CIFAR-10 training features of the net's last layer and
report CIFAR-10 test accuracy per ridge value; the paper picks epoch and reg by this accuracy (published:
inf π r=200 64.39 %, epoch 26, reg 1e-4). Logged as ``transfer/acc_reg{reg}`` and ``transfer/acc``
(best reg). Note that this is model selection on the CIFAR-10 test set, as in the paper.

The model's backbone must be a :class:`~manynets.networks.PiMLP` (infinite or finite); its
``kernel_features`` are collected in eval mode without gradients and the kernel math is
:func:`manynets.layers.feature_kernel.kernel_ridge_accuracy`. A 50k x 50k fp32 kernel is 10 GB:
``max_train`` subsamples on small machines.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import lightning.pytorch as pl
import torch

from manynets.analysis.passes import device_of, evaluation
from manynets.analysis.progress import Progress, tracked
from manynets.datamodules.base import ImageDataModule
from manynets.errors import ConfigError, check_arg
from manynets.layers.feature_kernel import kernel_ridge_accuracy
from manynets.networks import PiMLP

_ARG = "trainer.callbacks[FeatureKernelTransfer].init_args."


def collect_features(network: PiMLP, loader: Iterable, max_samples: int | None = None,
                     what: str = "feature-kernel transfer, features") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(kernel features in fp32, labels) over ``(images, labels)`` batches, at most ``max_samples`` rows;
    progress lines are headed ``what``."""
    feats, labels, n = [], [], 0
    device = device_of(network)
    total = len(loader) if hasattr(loader, "__len__") else None
    batch_size = getattr(loader, "batch_size", None)
    if total is not None and max_samples is not None and batch_size:
        total = min(total, -(-max_samples // batch_size))
    with evaluation(network):
        for images, y in tracked(loader, what, total):
            feats.append(network.kernel_features(images.to(device)).float())
            labels.append(y.to(device))
            n += len(y)
            if max_samples is not None and n >= max_samples:
                break
    f, y = torch.cat(feats), torch.cat(labels)
    return (f[:max_samples], y[:max_samples]) if max_samples is not None else (f, y)


class FeatureKernelTransfer(pl.Callback):
    """Kernel ridge regression on ``data``'s training split, scored on its test split, every n epochs.

    Args:
        data: the target data module (e.g. CIFAR10DataModule with the training normalisation, augment false).
        regs: ridge values.
        every_n_epochs: evaluation period.
        max_train: use at most this many training images (the full 50k kernel needs 10 GB in fp32).
    """

    def __init__(self, data: ImageDataModule, regs: Sequence[float] = (1e-4,), every_n_epochs: int = 1,
                 max_train: int | None = None) -> None:  # fmt: skip
        check_arg(every_n_epochs >= 1, _ARG + "every_n_epochs", every_n_epochs, ">= 1",
                  "1 evaluates after every epoch.")
        check_arg(len(regs) > 0 and all(r >= 0 for r in regs), _ARG + "regs", list(regs),
                  "a non-empty list of ridge values >= 0", "The paper uses [1e-4].")
        check_arg(max_train is None or max_train >= 1, _ARG + "max_train", max_train, "null (all) or >= 1 images")
        self.data, self.regs, self.every_n_epochs, self.max_train = data, list(regs), every_n_epochs, max_train
        self._ready = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = getattr(pl_module, "network", None)
        if not isinstance(network, PiMLP):
            raise ConfigError(
                f"FeatureKernelTransfer needs a model whose backbone is manynets.networks.PiMLP (the π-net's "
                f"feature kernel), got {type(network).__name__}. Remove the callback or set "
                "model.init_args.backbone.class_path: manynets.networks.PiMLP."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not self._ready:
            self.data.setup("fit")
            self.data.setup("test")
            self._ready = True
        test = self.data.test_dataloader()
        test = test[0] if isinstance(test, list) else test
        network = pl_module.network
        what = f"feature-kernel transfer after epoch {trainer.current_epoch}"
        f_train, y_train = collect_features(network, self.data.train_dataloader(), self.max_train,
                                            f"{what}: training features")  # fmt: skip
        f_test, y_test = collect_features(network, test, what=f"{what}: test features")
        progress = Progress(f"{what}: kernel ridge regression", len(self.regs), "ridge values")
        accs = kernel_ridge_accuracy(f_train, y_train, f_test, y_test, self.data.num_classes, self.regs,
                                     network.infinite)  # fmt: skip
        progress.update(len(accs))
        for reg, acc in accs.items():
            pl_module.log(f"transfer/acc_reg{reg:g}", acc)
        pl_module.log("transfer/acc", max(accs.values()))

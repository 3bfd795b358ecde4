"""Feature-kernel transfer evaluation of a π-net after every epoch (spec pinet_saturation §1.8).

The paper's ImageNet32 -> CIFAR-10 protocol: train the π-net on 250 random ImageNet 32x32 classes,
after each epoch fit kernel ridge regression on CIFAR-10 training features of the net's last layer and
report CIFAR-10 test accuracy per ridge value; the paper picks epoch and reg by this accuracy (published:
inf π r=200 64.39 %, epoch 26, reg 1e-4). Logged as ``transfer/acc_reg{reg}`` and ``transfer/acc``
(best reg). Note that this is model selection on the CIFAR-10 test set, as in the paper.
"""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl

from manynets.datamodules.base import ImageDataModule
from manynets.errors import check_arg
from manynets.layers.feature_kernel import feature_kernel_accuracy


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
        c = "trainer.callbacks[FeatureKernelTransfer].init_args."
        check_arg(every_n_epochs >= 1, c + "every_n_epochs", every_n_epochs, ">= 1", "1 evaluates after every epoch.")
        check_arg(len(regs) > 0 and all(r >= 0 for r in regs), c + "regs", list(regs), "a non-empty list of ridge "
                  "values >= 0", "The paper uses [1e-4].")
        check_arg(max_train is None or max_train >= 1, c + "max_train", max_train, "null (all) or >= 1 images")
        self.data, self.regs, self.every_n_epochs, self.max_train = data, list(regs), every_n_epochs, max_train
        self._ready = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not self._ready:
            self.data.setup("fit")
            self.data.setup("test")
            self._ready = True
        train = self.data.train_dataloader()
        test = self.data.test_dataloader()
        test = test[0] if isinstance(test, list) else test
        accs = feature_kernel_accuracy(pl_module.network, train, test, self.data.num_classes, self.regs, self.max_train)
        for reg, acc in accs.items():
            pl_module.log(f"transfer/acc_reg{reg:g}", acc)
        pl_module.log("transfer/acc", max(accs.values()))

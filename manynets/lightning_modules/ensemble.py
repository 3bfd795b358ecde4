"""Independently trained networks ensembled at test time: the baseline of the subspaces paper
(spec §3.4: 3 CIFAR / 2 Tiny ImageNet networks ensembled by logits; deep ensembles,
Lakshminarayanan et al. 2017).

Train k members with the plain config and different seeds, then test the ensemble::

    for s in 0 1 2; do manynets fit --config configs/subspaces/cifar10_cresnet20_standard.yaml \\
        --seed_everything $s --trainer.default_root_dir runs/cifar10_cresnet20_standard/seed$s \\
        --checkpoint.dirpath runs/cifar10_cresnet20_standard/seed$s/checkpoints; done
    manynets test --config configs/subspaces/cifar10_cresnet20_ensemble.yaml

The ensemble prediction is the mean of the member logits (official: their sum, the same argmax);
NLL/ECE/Brier are computed on its softmax, and ``test/member{k}/acc`` and ``test/ens_disagreement``
are logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from manynets.analysis import load_network
from manynets.errors import check_arg
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule


class CheckpointEnsembleModule(ClassifierModule):
    """Test-time ensemble of trained classifier checkpoints; ``predict_logits`` returns (k, B, C).

    Args:
        checkpoints: paths of k >= 1 checkpoints written by ``manynets fit`` with a
            :class:`ClassifierModule` and this ``backbone``.
        kwargs: the other :class:`ClassifierModule` arguments (only ``backbone`` matters; nothing is trained).
    """

    PAPER = "Lakshminarayanan et al., NeurIPS 2017 (deep ensembles)"

    loads_own_weights = True  # `manynets test` needs no --ckpt_path: its members come from model.init_args.checkpoints

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        checkpoints: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        check_arg(bool(checkpoints), "model.init_args.checkpoints", checkpoints, "a non-empty list of .ckpt paths",
                  "List the checkpoints of the trained ensemble members (they are loaded at setup).")
        super().__init__(backbone, num_classes, image_shape, **kwargs)
        del self.network
        self.checkpoints = list(checkpoints)
        self.members = nn.ModuleList([backbone(num_classes, self.image_shape) for _ in self.checkpoints])
        self._loaded = False

    def setup(self, stage: str) -> None:
        """Load the members' weights (at setup, so that configs instantiate before the members exist)."""
        if not self._loaded:
            self.load_members()

    def load_members(self) -> None:
        for k, (member, path) in enumerate(zip(self.members, self.checkpoints)):
            load_network(path, member, key=f"model.init_args.checkpoints[{k}]")
        self._loaded = True

    def compiled_modules(self) -> list[nn.Module]:
        """``compile: true`` compiles every member."""
        return list(self.members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images).mean(0)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Member logits (k, B, C); the ensemble is their mean."""
        return torch.stack([member(images) for member in self.members])

    def training_loss(self, images, labels):
        raise RuntimeError(
            "CheckpointEnsembleModule only evaluates trained members: run `manynets test` (or validate); "
            "train each member with the plain config and a different --seed_everything."
        )

"""MixMo: M encoders whose features are mixed, one shared core network, M heads.

Ramé, Sun & Cord, "MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks",
ICCV 2021 (arXiv 2103.06132); official code ``alexrame/mixmo-pytorch``; spec
``specs/superposition_mixmo_subspaces.md`` §2. The math lives in :mod:`manynets.layers.mixing`
and :mod:`manynets.layers.temperature`; this module wires it to the backbone seams:

* **Network** (spec §2.1): member k has its own ``stem`` and ``head`` (member 0 keeps the
  backbone's; the others are copies re-drawn with the backbone's own recipe,
  :meth:`~manynets.networks.Backbone.init_weights`); ``body`` and ``pool`` are shared. Training:
  ``h = M * sum_k m_k * f_k`` with ``f_k = stem_k(x_k)``. Inference: one image through every stem,
  ``h = sum_k stem_k(x)``; the ensemble prediction is the **mean of the member logits**.
* **Feature maps or vectors**: stems may output maps (B, C, h, w) (masks (B, M, h, w)) or vectors
  (B, C) (MLP-like backbones; masks (B, M, C)). Mixup mixes vectors linearly as maps; CutMix on
  vectors cuts a contiguous block of features of length ``2 * floor(floor(C * lam) / 2)`` (the 1-D
  case of the box rule, mean of the mask <= lam; :mod:`manynets.layers.mixing`).
* **Batch repetition on the device** (spec §2.3): the data module yields ``n = data.batch_size``
  unique images; each step repeats them ``b = batch_repetitions`` times and gives each member its
  own permutation (``proba_input_repetition`` shares the first positions), so a step holds
  ``B = n * b`` samples per member. **Epoch definition**: one epoch is one pass over the unique
  images, ``|D| / n = |D| * b / B`` steps -- the official, b-times-longer epoch when
  ``data.batch_size = B / b`` (as in every shipped config). To compare at the 1-net's steps per
  epoch, set ``trainer.limit_train_batches: 1/b``.
* **Mixing** (spec §2.2): Dirichlet(alpha) ratios, CutMix masks with probability ``cutmix_prob``
  (decaying over the last 1/12 of training) else mixup masks, role shuffle, ``weight_root``
  reweighting, soft-target CE summed over members, optional explicit ``l2_reg * sum ||theta||^2``.
  MIMO = ``alpha: 0, cutmix_prob: 0, weight_root: 1``; Linear-MixMo = ``cutmix_prob: 0``; the
  single-network mixup / CutMix baselines = ``num_members: 1`` with ``msda``.
* **Evaluation** (the base class's path, :meth:`evaluation_logits`): the members' logits, plus at
  test time the variant ``ts`` (ensemble logits / T, logged as ``test/ts/{acc,nll,ece,brier}``) with T
  fitted on the validation split (default; ``test/temperature``), or the official ``--tempscale``
  cross-fit on test halves (``temperature_scaling: test_halves``); ``test/ratio_errors`` (diversity
  over member pairs) besides the base metrics.
  CIFAR-10-C/100-C: use :class:`~manynets.datamodules.CIFARCorruptionsDataModule` as ``data`` at test
  time; metrics come per corruption and severity (``test/{set}/...``) and averaged (``test/mean/...``).
* **Model selection**: the CLI keeps the checkpoint with the best ``val/acc`` and the last one. The
  official code picks the epoch with the best *test* accuracy; manynets never selects on test.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from manynets.errors import check_arg
from manynets.layers.mixing import (
    member_weights,
    mix_features,
    mixing_method,
    mixmo_masks,
    msda as msda_mix,
    patch_probability,
    repetition_indices,
    role_permutation,
    sample_ratios,
    soft_cross_entropy,
)
from manynets.layers.temperature import cross_fit_temperature, fit_temperature
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule
from manynets.metrics import RatioErrors, classification_metrics


class MixMoModule(ClassifierModule):
    """MixMo / MIMO / Linear-MixMo and the mixup / CutMix single networks (see the module doc).

    Args:
        num_members: M subnetworks (1: a single network, optionally with ``msda``).
        alpha: Dirichlet concentration of the mixing ratios (2; <= 0 gives 1/M: MIMO).
        cutmix_prob: probability p that a batch uses CutMix masks instead of mixup masks
            (0.5 Cut-MixMo, 0 Linear-MixMo and MIMO); decays to 0 over the last 1/12 of the epochs.
        weight_root: r of the loss weights ``w_k ∝ lam_k^(1/r)`` (3; MIMO: 1).
        batch_repetitions: b, repetitions of each unique image per step (4 for MixMo, 1 for 1-nets).
        proba_input_repetition: share of positions with identical inputs across members.
        msda: mixed-sample data augmentation on the inputs (``cutmix``, ``mixup`` or None).
        msda_prob: probability of ``msda`` per member and sample. The partner image is drawn from the
            step's unique images (official: from the whole data set).
        msda_beta: ``msda`` mixing ratio ~ Beta(msda_beta, msda_beta).
        l2_reg: coefficient of the explicit ``sum ||theta||^2`` term over all parameters (the CIFAR
            recipes use 3e-4 with SGD ``weight_decay: 0``).
        temperature_scaling: ``val`` (fit T on the validation split), ``test_halves`` (official
            cross-fit on test halves) or ``none``.
    """

    PAPER = "Ramé, Sun & Cord, ICCV 2021 (MixMo)"

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        num_members: int = 2,
        alpha: float = 2.0,
        cutmix_prob: float = 0.5,
        weight_root: float = 3.0,
        batch_repetitions: int = 4,
        proba_input_repetition: float = 0.0,
        msda: Literal["cutmix", "mixup"] | None = None,
        msda_prob: float = 0.5,
        msda_beta: float = 1.0,
        l2_reg: float = 0.0,
        temperature_scaling: Literal["val", "test_halves", "none"] = "val",
        **kwargs: Any,
    ) -> None:
        m, prob = "model.init_args.", "a probability in [0, 1]"
        check_arg(num_members >= 1, m + "num_members", num_members, ">= 1", "MixMo uses 2; 1 is a single network.")
        check_arg(alpha >= 0, m + "alpha", alpha, ">= 0", "Dirichlet concentration: 2 in MixMo, 0 gives MIMO's 1/M.")
        check_arg(0.0 <= cutmix_prob <= 1.0, m + "cutmix_prob", cutmix_prob, prob, "0.5 in Cut-MixMo, 0 in MIMO.")
        check_arg(0.0 <= msda_prob <= 1.0, m + "msda_prob", msda_prob, prob, "A fraction: 0.5, not 50.")
        check_arg(msda_beta > 0, m + "msda_beta", msda_beta, "> 0", "1 in MixMo: lam' ~ Beta(1, 1).")
        check_arg(weight_root > 0, m + "weight_root", weight_root, "> 0", "3 in MixMo, 1 for MIMO.")
        check_arg(batch_repetitions >= 1, m + "batch_repetitions", batch_repetitions, ">= 1", "4 in MixMo; 1: 1-nets.")
        check_arg(0.0 <= proba_input_repetition <= 1.0, m + "proba_input_repetition", proba_input_repetition, prob)
        check_arg(l2_reg >= 0, m + "l2_reg", l2_reg, ">= 0", "3e-4 in the CIFAR recipes, 0 turns it off.")
        check_arg(not kwargs.get("label_smoothing"), m + "label_smoothing", kwargs.get("label_smoothing"), "0",
                  "MixMo trains on soft mixed targets; set it to 0.")
        super().__init__(backbone, num_classes, image_shape, **kwargs)
        self.num_members = num_members
        stems, heads = [self.network.stem], [self.network.head]
        for _ in range(num_members - 1):  # the backbone's own init recipe, re-drawn for each member
            stems.append(self.network.init_weights(copy.deepcopy(self.network.stem)))
            heads.append(self.network.init_weights(copy.deepcopy(self.network.head)))
        self.stems = nn.ModuleList(stems)
        self.heads = nn.ModuleList(heads)
        # the member stems/heads live in self.stems/self.heads only (no duplicate state-dict keys)
        self.network.stem = nn.Identity()
        self.network.head = nn.Identity()
        with torch.no_grad():
            was_training = self.stems[0].training
            self.stems[0].eval()
            features = self.stems[0](torch.zeros(1, *self.image_shape))
            self.stems[0].train(was_training)
        # masks are (B, M, *mask_shape): (h, w) for feature maps, (C,) for feature vectors
        self.mask_shape = tuple(features.shape[2:]) if features.dim() == 4 else tuple(features.shape[1:])
        self.temperature = 1.0

    # -- network -------------------------------------------------------------------
    def compiled_modules(self) -> list[nn.Module]:
        """``compile: true`` compiles each member's stem and head and the shared body."""
        return [*self.stems, self.network.body, *self.heads]

    def _core(self, h: torch.Tensor) -> torch.Tensor:
        return self.network.pool(self.network.body(h))

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Every member's logits (M, B, C) for the same images (h = sum_k stem_k(x)); (B, C) if M = 1."""
        h = self.stems[0](images)
        for stem in self.stems[1:]:
            h = h + stem(images)
        z = self._core(h)
        return torch.stack([head(z) for head in self.heads]) if self.num_members > 1 else self.heads[0](z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Ensemble logits: the mean of the member logits."""
        return self._ensemble(self.predict_logits(images))

    # -- training ------------------------------------------------------------------
    def progress(self) -> float:
        """Training progress t = epoch / max_epochs with epochs counted from 1 as in the official code,
        so the CutMix probability reaches 0 in the last epoch (spec §2.2); 0 without a trainer."""
        trainer = self._trainer
        max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        if not max_epochs or max_epochs < 0:
            return 0.0
        return (self.current_epoch + 1) / max_epochs

    def mixmo_inputs(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch formation and masks of one step: (inputs (M,B,C,H,W), targets (M,B,K), masks, own indices).

        Masks are (B, M, *mask_shape); targets are soft labels already multiplied by the member
        weights w_k, in float64 for a float64 model and float32 otherwise.
        """
        hp = self.hparams
        m, device = self.num_members, images.device
        dtype = torch.promote_types(images.dtype, torch.float32)
        own = repetition_indices(images.shape[0], m, hp.batch_repetitions, hp.proba_input_repetition, device)
        lam = sample_ratios(own.shape[1], m, hp.alpha, device, dtype=dtype)
        method = mixing_method(patch_probability(hp.cutmix_prob, self.progress())) if m > 1 else "mixup"
        role_perm = role_permutation(m) if m > 1 else None
        masks, lam = mixmo_masks(lam, self.mask_shape, method, role_perm)
        if hp.msda is not None:
            inputs, targets = msda_mix(images, own, labels, masks, self.num_classes, hp.msda, hp.msda_prob, hp.msda_beta)
        else:
            inputs = images[own]
            targets = F.one_hot(labels[own], self.num_classes).to(dtype)
        weights = member_weights(lam, hp.weight_root) if m > 1 else torch.ones_like(lam)
        targets = targets * weights.t()[..., None]
        return inputs, targets, masks, own

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum over members of the soft-target CE (+ the explicit L2 term); returns (loss, member 0's
        logits, member 0's labels): train accuracy compares member 0 with its own repeated labels."""
        inputs, targets, masks, own = self.mixmo_inputs(images, labels)
        if self.num_members == 1:
            h = self.stems[0](inputs[0])
        else:
            h = mix_features(torch.stack([stem(x) for stem, x in zip(self.stems, inputs)]), masks)
        z = self._core(h)
        logits = [head(z) for head in self.heads]
        loss = sum(soft_cross_entropy(zk, tk) for zk, tk in zip(logits, targets))
        if self.hparams.l2_reg:
            params = [p for p in self.parameters() if p.requires_grad]
            loss = loss + self.hparams.l2_reg * torch.stack(torch._foreach_norm(params)).pow(2).sum()
        return loss, logits[0], labels[own[0]]

    # -- evaluation: temperature scaling and ratio-errors ----------------------------
    def evaluation_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``""``: the members' logits (M, B, C) (ensemble = their mean; (B, C) if M = 1); at test time
        with ``temperature_scaling: val`` also ``ts``: the ensemble logits / T, logged as ``test/ts/...``."""
        members = self.predict_logits(images)
        variants = {"": members}
        if self.hparams.temperature_scaling == "val" and self._trainer is not None and self.trainer.testing:
            variants["ts"] = self._ensemble(members) / self.temperature
        return variants

    def on_test_start(self) -> None:
        super().on_test_start()
        self.ratio_errors = nn.ModuleList(
            [RatioErrors(self.num_members) for _ in self.test_set_names]
        ).to(self.device)
        self._collected: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.test_set_names]
        self.temperature = self._fit_on_validation() if self.hparams.temperature_scaling == "val" else 1.0

    def _fit_on_validation(self) -> float:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            warnings.warn("MixMoModule: no data module with a validation split; temperature scaling skipped.")
            return 1.0
        if getattr(datamodule, "val_dataset", True) is None:
            datamodule.setup("validate")
        logits, labels = [], []
        with torch.no_grad():
            for images, targets in datamodule.val_dataloader():
                logits.append(self._ensemble(self.predict_logits(images.to(self.device))).float())
                labels.append(targets.to(self.device))
        return fit_temperature(torch.cat(logits), torch.cat(labels))

    def update_test_extras(self, dataloader_idx: int, variants: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Ratio-errors of the members and, for ``test_halves``, the ensemble logits of the set."""
        members = variants[""]
        if members.dim() == 3:
            self.ratio_errors[dataloader_idx].update(members, labels)
        if self.hparams.temperature_scaling == "test_halves":
            self._collected[dataloader_idx].append((self._ensemble(members).float(), labels))

    def extra_test_metrics(self, index: int) -> dict[str, torch.Tensor]:
        """``ratio_errors`` and ``temperature`` of test set ``index``, plus ``ts/*`` for ``test_halves``
        (for ``val`` the base class logs the ``ts`` variant)."""
        values: dict[str, torch.Tensor] = {}
        if self.num_members > 1:
            values["ratio_errors"] = self.ratio_errors[index].compute()
        mode = self.hparams.temperature_scaling
        if mode == "val":
            values["temperature"] = torch.tensor(self.temperature)
        elif mode == "test_halves" and self._collected[index]:
            logits, labels = (torch.cat(parts) for parts in zip(*self._collected[index]))
            values.update(self.cross_fit_metrics(logits, labels))
        return values

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        for metric in self.ratio_errors:
            metric.reset()

    def cross_fit_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Official ``--tempscale``: fit on one test half, evaluate on the other, average both ways."""
        halves = cross_fit_temperature(logits, labels)
        per_half = []
        for idx, temperature in halves:
            metrics = classification_metrics(self.num_classes, "").to(logits.device)
            metrics.update(logits[idx] / temperature, labels[idx])
            per_half.append(metrics.compute())
        values = {f"ts/{k}": torch.stack([h[k] for h in per_half]).mean() for k in per_half[0]}
        values["temperature"] = torch.tensor(sum(t for _, t in halves) / len(halves))
        return values

"""Shared base of every method: a backbone, the metrics, the optimisation and ensembles.

Methods subclass :class:`ClassifierModule` and override two hooks:

- :meth:`training_loss` ``(images, labels) -> (loss, logits)``: the method's training
  objective on one batch; ``logits`` (B, C) feed the train accuracy (a method may return the
  first B' <= B rows only: superposition truncates training batches to whole groups).
- :meth:`predict_logits` ``(images) -> logits``: evaluation logits, either (B, C) or
  per-member (M, B, C). The ensemble prediction is the **mean of the member logits**
  (as in MIMOConv, MixMo and subspaces); NLL, ECE and Brier are computed on its softmax.
  There is one row for every image (:func:`check_scored`), so validation and test metrics cover
  exactly the images of the set. Exception, Lightning's: under DDP its DistributedSampler repeats
  up to (number of processes - 1) images so that every process gets as many; those are scored twice
  (evaluate on one device for exact numbers).

Metric names are the same for all methods: ``{train,val,test}/{acc,nll,ece,brier}``
(ECE: 15 equal-width bins on the max softmax probability; Brier: sum over classes,
mean over samples). Ensembles add ``test/ens_disagreement`` and ``test/member{k}/acc``.
With several named test sets (e.g. corruptions) every name gets the set's prefix,
``test/{set}/acc``, and ``test/mean/...`` averages the sets other than ``clean``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from manynets import random_state
from manynets.errors import CheckpointMismatchError, ConfigError, NonFiniteError, check_arg
from manynets.metrics import Disagreement, classification_metrics  # noqa: F401 (re-exported)

BackboneFactory = Callable[[int, tuple[int, int, int]], nn.Module]
"""A backbone class with its options; called as ``backbone(num_classes, image_shape)``."""

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_STEP_SCHEDULERS = ("OneCycleLR", "CyclicLR")


def check_scored(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise unless evaluation logits (B, C) or (M, B, C) have one row for each of the B labelled images.

    Validation and test metrics cover exactly the images of the set: a method must not drop images of
    an evaluation batch (superposition pads its last partial group instead, see
    :meth:`~manynets.lightning_modules.SuperpositionModule.forward_superposed`).
    """
    if logits.shape[-2] != labels.shape[0]:
        raise RuntimeError(
            f"{logits.shape[-2]} rows of evaluation logits for a batch of {labels.shape[0]} images; "
            "predict_logits must return one row per image so that every image of the set is scored."
        )


NonFiniteLossError = NonFiniteError  # the name used before the errors module existed


class ClassifierModule(pl.LightningModule):
    """A plain classifier (the baseline every method is compared with) and the base of all methods.

    Args:
        backbone: backbone class and options, e.g. ``{class_path: manynets.networks.WideResNet,
            init_args: {depth: 28, width: 10}}``; ``num_classes`` and ``image_shape`` come from the data.
        num_classes, image_shape: linked from the data module by the CLI.
        optimizer: optimizer class and options; it receives the parameter groups.
        lr_scheduler: scheduler class and options. ``total_steps`` (OneCycleLR) and ``T_max``
            (CosineAnnealingLR) are filled in from the trainer when not given.
        scheduler_interval: ``step`` or ``epoch``; default ``step`` for OneCycleLR/CyclicLR, else ``epoch``.
        warmup_steps: linear warm-up of the learning rate from 0 over this many optimizer steps
            (a factor on top of the scheduler).
        warmup_epochs: warm-up by epochs, factor (e + 1) / warmup_epochs in epoch e (subspaces recipe).
        no_weight_decay: what gets weight decay 0: ``"norm"`` (all normalisation layers), ``"bias"``
            (all biases), a module class name (e.g. ``PReLU``) or a substring of a parameter name.
        label_smoothing: label smoothing of the cross-entropy.
    """

    loads_own_weights = False
    """True for modules whose weights come from their own arguments (checkpoint ensembles, probes): the CLI
    then evaluates them without ``--ckpt_path``."""

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] | None = None,
        warmup_steps: int = 0,
        warmup_epochs: int = 0,
        no_weight_decay: list[str] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        m = "model.init_args."
        check_arg(0.0 <= label_smoothing < 1.0, m + "label_smoothing", label_smoothing, "a fraction in [0, 1)",
                  "0 turns it off; 0.1 is usual.")
        check_arg(warmup_steps >= 0, m + "warmup_steps", warmup_steps, ">= 0 optimizer steps", "0 turns warm-up off.")
        check_arg(warmup_epochs >= 0, m + "warmup_epochs", warmup_epochs, ">= 0 epochs", "0 turns warm-up off.")
        check_arg(not (warmup_steps and warmup_epochs), m + "warmup_epochs", warmup_epochs,
                  f"0 when {m}warmup_steps is set ({warmup_steps})", "Warm up by steps or by epochs, not both.")
        check_arg(scheduler_interval in (None, "step", "epoch"), m + "scheduler_interval", scheduler_interval,
                  "'step', 'epoch' or null (step for OneCycleLR/CyclicLR, else epoch)")
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.network = backbone(num_classes, self.image_shape)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = nn.ModuleList()  # one collection per test set, built in on_test_start

    # -- hooks for methods ---------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the backbone; returns (loss, logits)."""
        logits = self(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing), logits

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits: (B, C), or (M, B, C) for an ensemble of M members, one row for every
        one of the B images (evaluation scores every image of the set; see :func:`check_scored`)."""
        return self(images)

    # -- training ------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, logits = self.training_loss(images, labels)
        self.check_finite(loss)
        # A method may train on the first rows of the batch only (superposition truncates B to a multiple
        # of n, as the official code); the train accuracy scores those rows. Evaluation scores every image.
        self.train_acc(logits.detach(), labels[: logits.shape[0]])
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise a clear error on a NaN/inf loss, unless a callback (e.g. GradientFilter) handles it."""
        if any(getattr(cb, "handles_nonfinite_loss", False) for cb in self.trainer.callbacks):
            return
        if not torch.isfinite(loss.detach()).all():
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise NonFiniteLossError(
                f"Training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}. "
                "Lower the learning rate, clip gradients (trainer.gradient_clip_val) or add the "
                "manynets.callbacks.GradientFilter callback, which skips such steps. "
                f"Checkpoints of finished epochs are kept (last: {ckpt})."
            )

    # -- evaluation ----------------------------------------------------------------
    def _ensemble(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0) if logits.dim() == 3 else logits

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self._ensemble(self.predict_logits(images))
        check_scored(logits, labels)
        self.val_metrics.update(logits.float(), labels)
        for name, metric in self.val_metrics.items():
            self.log(name, metric, prog_bar=name == "val/acc")

    def on_test_start(self) -> None:
        names = list(getattr(self.trainer.datamodule, "test_set_names", None) or [])
        num_loaders = len(self.trainer.test_dataloaders) if isinstance(self.trainer.test_dataloaders, list) else 1
        if len(names) != num_loaders:
            names = ["test"] if num_loaders == 1 else [f"set{i}" for i in range(num_loaders)]
        self.test_set_names = names
        self.test_metrics = nn.ModuleList(
            [self._test_collection() for _ in names]
        ).to(self.device)

    def _test_collection(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {"ensemble": classification_metrics(self.num_classes, ""), "members": nn.ModuleList(),
             "disagreement": Disagreement()}
        )

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        member_logits = self.predict_logits(images)
        check_scored(member_logits, labels)
        metrics = self.test_metrics[dataloader_idx]
        metrics["ensemble"].update(self._ensemble(member_logits).float(), labels)
        if member_logits.dim() == 3:
            members = metrics["members"]
            while len(members) < member_logits.shape[0]:
                members.append(MulticlassAccuracy(self.num_classes, average="micro").to(self.device))
            for member, logits in zip(members, member_logits):
                member.update(logits, labels)
            metrics["disagreement"].update(member_logits)

    def extra_test_metrics(self, index: int) -> dict[str, torch.Tensor]:
        """A method's own test metrics of test set ``index``; logged beside the shared ones (and averaged
        over the shifted sets as ``test/mean/...``)."""
        return {}

    def on_test_epoch_end(self) -> None:
        results: dict[str, dict[str, torch.Tensor]] = {}
        for i, (name, metrics) in enumerate(zip(self.test_set_names, self.test_metrics)):
            values = dict(metrics["ensemble"].compute())
            for k, member in enumerate(metrics["members"]):
                values[f"member{k}/acc"] = member.compute()
            if len(metrics["members"]):
                values["ens_disagreement"] = metrics["disagreement"].compute()
            values.update(self.extra_test_metrics(i))
            results[name] = values
        single = len(results) == 1
        for name, values in results.items():
            prefix = "test/" if single else f"test/{name}/"
            self.log_dict({prefix + k: v for k, v in values.items()})
        shifted = [v for n, v in results.items() if n != "clean"]
        if not single and shifted:
            for key in shifted[0]:
                self.log(f"test/mean/{key}", torch.stack([v[key] for v in shifted]).mean())
        for metrics in self.test_metrics:
            metrics["ensemble"].reset()
            for member in metrics["members"]:
                member.reset()
            metrics["disagreement"].reset()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._ensemble(self.predict_logits(images)).softmax(-1)

    # -- optimisation --------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: with weight decay, and without (per ``no_weight_decay``)."""
        rules = self.hparams.no_weight_decay or []
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                excluded = any(
                    (rule == "norm" and isinstance(module, _NORM_TYPES))
                    or (rule == "bias" and name == "bias")
                    or rule == type(module).__name__
                    or rule in full
                    for rule in rules
                )
                (no_decay if excluded else decay).append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        target = _factory_target(self.scheduler_factory)
        interval = self.hparams.scheduler_interval or (
            "step" if target is not None and target.__name__ in _STEP_SCHEDULERS else "epoch"
        )
        scheduler = self.scheduler_factory(optimizer, **self._scheduler_lengths(target, interval))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _scheduler_lengths(self, target: type | None, interval: str) -> dict[str, int]:
        """Fill ``total_steps`` / ``T_max`` from the trainer when the config leaves them out."""
        if target is None:
            return {}
        given = getattr(self.scheduler_factory, "keywords", {})
        params = inspect.signature(target).parameters
        length = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        extra = {}
        for key in ("total_steps", "T_max"):
            if key in params and given.get(key) is None:
                if length is None or length < 0 or length == float("inf"):
                    raise ConfigError(
                        f"trainer.max_epochs = {self.trainer.max_epochs}: {target.__name__} needs a finite "
                        f"length ({key}, in {interval}s). Set trainer.max_epochs (or trainer.max_steps) to a "
                        f"positive number, or give model.init_args.lr_scheduler.init_args.{key}."
                    )
                extra[key] = int(length)
        return extra

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Apply the linear warm-up factor to the scheduled learning rate for this step only."""
        factor = 1.0
        if self.hparams.warmup_steps and self.global_step < self.hparams.warmup_steps:
            factor = (self.global_step + 1) / self.hparams.warmup_steps
        elif self.hparams.warmup_epochs and epoch < self.hparams.warmup_epochs:
            factor = (epoch + 1) / self.hparams.warmup_epochs
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] *= factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(optimizer.param_groups, scheduled):
                group["lr"] = lr

    # -- checkpoints ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's random-number states go into the checkpoint (:mod:`manynets.random_state`)."""
        checkpoint["random_states"] = random_state.gather()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fail with a clear message when a checkpoint's weights do not fit this model; when fitting,
        restore this rank's random-number states so a resumed run continues the same streams."""
        self._check_fits(checkpoint)
        trainer = self._trainer
        states = checkpoint.get("random_states")
        if trainer is None or not states or trainer.state.fn != "fit":
            return
        if len(states) == trainer.world_size:
            random_state.restore(states[trainer.global_rank])
        else:
            warnings.warn(
                f"The checkpoint was written by {len(states)} processes, this run has {trainer.world_size}: "
                "random-number states are not restored, so the resumed run will not repeat the original one.",
                stacklevel=2,
            )

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        missing = [k for k in own if k not in state and not _is_metric_state(k)]
        unexpected = [k for k in state if k not in own and not _is_metric_state(k)]
        mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            details = "; ".join(
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
                if keys
            )
            raise CheckpointMismatchError(
                f"This checkpoint does not fit {type(self).__name__} with backbone "
                f"{type(self.network).__name__} ({details}). It was saved by another model or backbone: "
                "pass the config the checkpoint was trained with (config.yaml beside its log directory)."
            )


def _is_metric_state(key: str) -> bool:
    return "metrics" in key or key.startswith("train_acc")


def _factory_target(factory: Callable) -> type | None:
    """The class behind a jsonargparse class-callable (a functools.partial), if any."""
    if inspect.isclass(factory):
        return factory
    for arg in (getattr(factory, "func", None), *getattr(factory, "args", ())):
        if inspect.isclass(arg):
            return arg
    return None


def ensemble_mean(member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """Ensemble prediction of several members: the mean of their logits."""
    return torch.stack(list(member_logits)).mean(0)


warnings.filterwarnings("ignore", message=".*does not have many workers.*")

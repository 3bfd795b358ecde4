"""Shared base of every method: a backbone, the metrics, one evaluation path and ensembles.

Methods subclass :class:`ClassifierModule` and override hooks (ARCHITECTURE.md, "The one idea"):

- :meth:`~ClassifierModule.training_loss` ``(images, labels) -> (loss, logits, labels_for_logits)``:
  the method's training objective on one batch; ``logits`` (B', C) feed the train accuracy against
  ``labels_for_logits`` (B',) (superposition's truncated labels, MixMo member 0's repeated labels).
  The base :meth:`~ClassifierModule.training_step` is the only one (the π-net's manual step aside).
- :meth:`~ClassifierModule.predict_logits` ``(images) -> logits``: the default prediction, either (B, C)
  or per-member (M, B, C). The ensemble prediction is the **mean of the member logits** (as in
  MIMOConv, MixMo and subspaces); NLL, ECE and Brier are computed on its softmax.
- :meth:`~ClassifierModule.evaluation_logits` ``(images) -> {variant: logits}``: named evaluation
  variants, ``""`` the default prediction (``predict_logits``); e.g. superposition's ``n1``, ``n2``,
  MixMo's temperature-scaled ``ts``. The base validation and test steps score every variant.
- :meth:`~ClassifierModule.update_test_extras` / :meth:`~ClassifierModule.extra_test_metrics`: a
  method's own test metrics from the variants' logits, logged beside the shared ones.

Every variant has one row for every image (:func:`check_scored`), so validation and test metrics
cover exactly the images of the set. Exception, Lightning's: under DDP its DistributedSampler repeats
up to (number of processes - 1) images so that every process gets as many; those are scored twice
(evaluate on one device for exact numbers).

Metric names are the same for all methods: ``{train,val,test}/{acc,nll,ece,brier}``
(ECE: 15 equal-width bins on the max softmax probability; Brier: sum over classes, mean over
samples) for the default variant; ``val/{variant}/...`` and ``test/{variant}/...`` for the others.
Members add ``test/ens_disagreement`` and ``test/member{k}/acc`` (``test/{variant}/member{k}/acc``).
With several named test sets (e.g. corruptions) every test name gets the set's prefix,
``test/{set}/acc``, ``test/{set}/{variant}/acc``, and ``test/mean/...`` averages the sets other
than ``clean``. Parameter groups, schedules and warm-up: :mod:`.optimization`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from manynets import random_state
from manynets.errors import CheckpointMismatchError, ConfigError, NonFiniteError, check_arg
from manynets.lightning_modules.optimization import OptimizationMixin
from manynets.lightning_modules.optimization import factory_target as _factory_target  # noqa: F401 (re-exported)
from manynets.metrics import Disagreement, classification_metrics  # noqa: F401 (re-exported)
from manynets.networks import Backbone

BackboneFactory = Callable[[int, tuple[int, int, int]], Backbone]
"""A backbone class with its options; called as ``backbone(num_classes, image_shape)``."""


def check_scored(logits: torch.Tensor, labels: torch.Tensor, variant: str = "") -> None:
    """Raise unless evaluation logits (B, C) or (M, B, C) have one row for each of the B labelled images.

    Validation and test metrics cover exactly the images of the set: a method must not drop images of
    an evaluation batch (superposition pads its last partial group instead, see
    :meth:`~manynets.lightning_modules.SuperpositionModule.forward_superposed`).
    """
    if logits.dim() not in (2, 3) or logits.shape[-2] != labels.shape[0]:
        raise RuntimeError(
            f"{logits.shape[-2] if logits.dim() >= 2 else 0} rows of evaluation logits (variant {variant!r}, "
            f"shape {tuple(logits.shape)}) for a batch of {labels.shape[0]} images; evaluation_logits must "
            "return (B, C) or (M, B, C) for every variant so that every image of the set is scored."
        )


def check_backbone(network: nn.Module, method: str) -> None:
    """Raise a :class:`ConfigError` unless ``network`` is a :class:`manynets.networks.Backbone`."""
    if not isinstance(network, Backbone):
        kind = type(network)
        raise ConfigError(
            f"model.init_args.backbone = {kind.__module__}.{kind.__qualname__}: expected a "
            f"manynets.networks.Backbone ({method} works at its seams stem -> body -> pool -> head). Use a "
            "manynets.networks class (WideResNet, PreActResNet, ResNet, CifarResNet, VGG, MLP, ...) or make "
            "the class subclass manynets.networks.Backbone (stem, body, pool, head, stem_channels, feature_dim)."
        )


_VARIANT = "v_"
"""Prefix of a variant's submodule name (a variant may be called like a Module attribute: ``half``, ``to``)."""


def _scores(num_classes: int) -> nn.ModuleDict:
    """Test metrics of one variant of one test set: the ensemble's; for members (M, B, C) also each
    member's accuracy and their disagreement (added at the first batch of members)."""
    return nn.ModuleDict({"ensemble": classification_metrics(num_classes, ""), "members": nn.ModuleList()})


NonFiniteLossError = NonFiniteError  # the name used before the errors module existed


class ClassifierModule(OptimizationMixin, pl.LightningModule):
    """A plain classifier (the baseline every method is compared with) and the base of all methods.

    Args:
        backbone: backbone class and options, e.g. ``{class_path: manynets.networks.WideResNet,
            init_args: {depth: 28, width: 10}}``; ``num_classes`` and ``image_shape`` come from the data.
        num_classes: number of classes (linked from the data module by the CLI).
        image_shape: (channels, height, width) of the input images (linked from the data module by the CLI).
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
        channels_last: keep the 4-D weights (convolutions) and the image batches in the channels-last
            memory format (NHWC), the layout fast convolution kernels want under ``bf16-mixed`` (cuDNN, oneDNN);
            the same model and numbers, another layout. Applied in :meth:`configure_model`.
        compile: ``torch.compile`` the forward of the method's networks (:meth:`compiled_modules`) in
            :meth:`configure_model`, in place (``nn.Module.compile``), so state-dict keys and checkpoints
            are the same as without; the first steps pay the compilation (tens of seconds).
    """

    PAPER = ""  # a method's paper (authors, venue, name), shown by `manynets list`; the plain baseline has none

    loads_own_weights = False
    """True for modules whose weights come from their own arguments (checkpoint ensembles, probes): the CLI
    then evaluates them without ``--ckpt_path``. Their networks come from checkpoints at ``setup``
    (trained by another module), so the backbone type is not checked here."""

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
        channels_last: bool = False,
        compile: bool = False,
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
        if not self.loads_own_weights:
            check_backbone(self.network, type(self).__name__)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes, "val/")  # variant ""
        self.val_variant_metrics = nn.ModuleDict()  # the other variants, added at their first batch
        self.test_metrics = nn.ModuleList()  # per test set: variant "" (_scores), built in on_test_start
        self.test_variant_metrics = nn.ModuleList()  # per test set: {variant: _scores}
        self.channels_last, self.compile_forward = channels_last, compile  # applied once, in configure_model
        self._fast_path_applied = False

    # -- fast path: channels_last and torch.compile ----------------------------------
    def compiled_modules(self) -> list[nn.Module]:
        """The modules whose forward ``compile: true`` compiles: those the method's steps call (default:
        the backbone). Methods that call the backbone's seams one by one list the parts they call."""
        return [self.network]

    def configure_model(self) -> None:
        """Apply ``channels_last`` and ``compile`` once (Lightning calls this hook before it builds the
        optimizers and restores a checkpoint, at every ``fit``/``validate``/``test``)."""
        if self._fast_path_applied:
            return
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # 4-D parameters and buffers, in place
        if self.compile_forward:
            for module in self.compiled_modules():
                module.compile()  # in place: no ``_orig_mod.`` in state-dict keys
        self._fast_path_applied = True

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``channels_last``, image batches (B, C, H, W) in the channels-last memory format (a data
        module that overrides this hook itself takes precedence, Lightning's rule; then only the weights are)."""
        if self.channels_last and isinstance(batch, (tuple, list)) and batch and _is_maps(batch[0]):
            batch = type(batch)([batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]])
        return batch

    # -- hooks for methods ---------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy of the backbone; returns (loss, logits, the labels of the logits' rows)."""
        logits = self(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing), logits, labels

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The default prediction: (B, C), or (M, B, C) for an ensemble of M members, one row for every
        one of the B images (evaluation scores every image of the set; see :func:`check_scored`)."""
        return self(images)

    def evaluation_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named evaluation variants ``{variant: (B, C) or (M, B, C)}``; ``""`` is the default prediction
        (equal to :meth:`predict_logits`, which ``predict_step`` uses). Names are path-free words
        (``n2``, ``ts``): they become ``val/{variant}/...`` and ``test/{variant}/...``."""
        return {"": self.predict_logits(images)}

    def update_test_extras(self, dataloader_idx: int, variants: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """A method's own test metrics of test set ``dataloader_idx``, updated from the variants' logits of the
        batch that the base test step has just scored; reported by :meth:`extra_test_metrics`."""

    def extra_test_metrics(self, index: int) -> dict[str, torch.Tensor]:
        """A method's own test metrics of test set ``index``; logged beside the shared ones (and averaged
        over the shifted sets as ``test/mean/...``)."""
        return {}

    # -- training ------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, logits, targets = self.training_loss(images, labels)
        self.check_finite(loss)
        self.train_acc(logits.detach(), targets)
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

    # -- evaluation: every variant scores every image ----------------------------------
    def _ensemble(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0) if logits.dim() == 3 else logits

    def _variants(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        variants = self.evaluation_logits(images)
        if "" not in variants:
            raise RuntimeError(f"{type(self).__name__}.evaluation_logits returned {list(variants)}: it must "
                               "include the default prediction under the key ''.")
        for name, logits in variants.items():
            if name and ("." in name or "/" in name or not name.strip()):
                raise RuntimeError(f"evaluation variant {name!r}: a name without '.' or '/' (e.g. 'n2', 'ts').")
            check_scored(logits, labels, name)
        return variants

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        for variant, logits in self._variants(images, labels).items():
            attribute = "val_metrics"
            if variant:
                attribute = f"val_variant_metrics.{_VARIANT}{variant}"
                if _VARIANT + variant not in self.val_variant_metrics:
                    self.val_variant_metrics[_VARIANT + variant] = classification_metrics(
                        self.num_classes, f"val/{variant}/").to(self.device)  # fmt: skip
            collection: MetricCollection = self.get_submodule(attribute)
            collection.update(self._ensemble(logits).float(), labels)
            for key, metric in collection.items(keep_base=True):
                name = collection.prefix + key
                self.log(name, metric, prog_bar=name == "val/acc", metric_attribute=f"{attribute}.{key}")

    def on_test_start(self) -> None:
        names = list(getattr(self.trainer.datamodule, "test_set_names", None) or [])
        num_loaders = len(self.trainer.test_dataloaders) if isinstance(self.trainer.test_dataloaders, list) else 1
        if len(names) != num_loaders:
            names = ["test"] if num_loaders == 1 else [f"set{i}" for i in range(num_loaders)]
        self.test_set_names = names
        self.test_metrics = nn.ModuleList([_scores(self.num_classes) for _ in names]).to(self.device)
        self.test_variant_metrics = nn.ModuleList([nn.ModuleDict() for _ in names])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Scores every variant; returns the default prediction's logits (B, C) (mean of the member logits)
        for callbacks' ``on_test_batch_end`` (e.g. :class:`~manynets.callbacks.ReliabilityDiagram`)."""
        images, labels = batch
        variants = self._variants(images, labels)
        for variant, logits in variants.items():
            scores = self._test_scores(dataloader_idx, variant)
            scores["ensemble"].update(self._ensemble(logits).float(), labels)
            if logits.dim() == 3:
                members = scores["members"]
                while len(members) < logits.shape[0]:
                    members.append(MulticlassAccuracy(self.num_classes, average="micro").to(self.device))
                if "disagreement" not in scores:
                    scores["disagreement"] = Disagreement().to(self.device)
                for member, member_logits in zip(members, logits):
                    member.update(member_logits, labels)
                scores["disagreement"].update(logits)
        self.update_test_extras(dataloader_idx, variants, labels)
        return self._ensemble(variants[""]).detach()

    def _test_scores(self, index: int, variant: str) -> nn.ModuleDict:
        if not variant:
            return self.test_metrics[index]
        per_set = self.test_variant_metrics[index]
        if _VARIANT + variant not in per_set:
            per_set[_VARIANT + variant] = _scores(self.num_classes).to(self.device)
        return per_set[_VARIANT + variant]

    @staticmethod
    def _compute(scores: nn.ModuleDict, prefix: str = "") -> dict[str, torch.Tensor]:
        values = {prefix + k: v for k, v in scores["ensemble"].compute().items()}
        for k, member in enumerate(scores["members"]):
            values[f"{prefix}member{k}/acc"] = member.compute()
        if "disagreement" in scores:
            values[f"{prefix}ens_disagreement"] = scores["disagreement"].compute()
        return values

    def on_test_epoch_end(self) -> None:
        results: dict[str, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self.test_set_names):
            values = self._compute(self.test_metrics[i])
            for key, scores in self.test_variant_metrics[i].items():
                values.update(self._compute(scores, f"{key.removeprefix(_VARIANT)}/"))
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
        for scores in (*self.test_metrics, *(s for per_set in self.test_variant_metrics for s in per_set.values())):
            for metric in scores.modules():
                if isinstance(metric, Metric):
                    metric.reset()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Probabilities of the default variant (the softmax of the mean member logits)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._ensemble(self.predict_logits(images)).softmax(-1)

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


def _is_maps(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()


def _is_metric_state(key: str) -> bool:
    return "metrics" in key or key.startswith("train_acc")


def ensemble_mean(member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """Ensemble prediction of several members: the mean of their logits."""
    return torch.stack(list(member_logits)).mean(0)


warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# ClassifierModule.on_after_batch_transfer (channels_last) is meant to run with data modules (which leave it alone)
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule` but.*")

"""The optimisation half of :class:`~manynets.lightning_modules.ClassifierModule`, shared by every method.

- :meth:`OptimizationMixin.parameter_groups`: two groups, with and without weight decay
  (``no_weight_decay`` rules), named ``decay`` and ``no_decay``; methods with their own groups (the
  π-net's lr multipliers) override it.
- The scheduler config is named ``lr``, so Lightning's LearningRateMonitor logs ``lr/decay`` and
  ``lr/no_decay`` (scheduler name / group name; one group: ``lr``; no scheduler: ``lr-SGD/decay``...).
- :meth:`OptimizationMixin.configure_optimizers`: the config's ``optimizer`` / ``lr_scheduler``
  callables get the groups; ``total_steps`` (OneCycleLR) and ``T_max`` (CosineAnnealingLR) come from
  the trainer when the config leaves them out, so schedule lengths follow ``trainer.max_epochs``.
- :meth:`OptimizationMixin.optimizer_step`: linear warm-up as a factor on the scheduled learning rate,
  by optimizer steps (``warmup_steps``) or by epochs (``warmup_epochs``, the subspaces recipe).

The mixin reads ``self.hparams`` (``no_weight_decay``, ``scheduler_interval``, ``warmup_steps``,
``warmup_epochs``), ``self.optimizer_factory`` and ``self.scheduler_factory``, all set by
``ClassifierModule.__init__``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from manynets.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
STEP_SCHEDULERS = ("OneCycleLR", "CyclicLR")
"""Schedulers stepped every optimizer step by default (the others every epoch)."""


def factory_target(factory: Callable) -> type | None:
    """The class behind a jsonargparse class-callable (a functools.partial), if any."""
    if inspect.isclass(factory):
        return factory
    for arg in (getattr(factory, "func", None), *getattr(factory, "args", ())):
        if inspect.isclass(arg):
            return arg
    return None


class OptimizationMixin:
    """Parameter groups, optimizer and scheduler from the config's callables, and warm-up (module doc)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: with weight decay, and without (per ``no_weight_decay``: ``"norm"`` for every
        normalisation layer, ``"bias"`` for every bias, a module class name, or a substring of a
        parameter name)."""
        rules = self.hparams.no_weight_decay or []
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                excluded = any(
                    (rule == "norm" and isinstance(module, NORM_TYPES))
                    or (rule == "bias" and name == "bias")
                    or rule == type(module).__name__
                    or rule in full
                    for rule in rules
                )
                (no_decay if excluded else decay).append(param)
        if not no_decay:
            return [{"params": decay}]
        return [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        target = factory_target(self.scheduler_factory)
        interval = self.hparams.scheduler_interval or (
            "step" if target is not None and target.__name__ in STEP_SCHEDULERS else "epoch"
        )
        scheduler = self.scheduler_factory(optimizer, **self._scheduler_lengths(target, interval))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "name": "lr"}}

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

"""A LayerSync plugin for the DDP tests: synchronised batch norm that also runs on CPU (gloo).

``torch.nn.SyncBatchNorm`` only runs on GPUs (DDP refuses to wrap it on CPU: "SyncBatchNorm
layers only work with GPU modules"), so ``--trainer.sync_batchnorm=true`` alone fails on a CPU
run. Adding ``--trainer.plugins=gloo_sync_batchnorm.GlooSyncBatchNorm`` (with this folder on
PYTHONPATH) replaces Lightning's ``TorchSyncBatchNorm`` with this subclass, which computes the
batch statistics of each BatchNorm layer over the batches of all ranks with a differentiable
``all_reduce`` (``torch.distributed.nn.functional``): the same mathematics as SyncBatchNorm
(mean and biased variance of the global batch for normalising, unbiased variance for the
running estimate), with the sums in float64.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn


class _GlooSyncMixin:
    """Put in front of a BatchNorm class: training-mode statistics are those of the global batch."""

    _original_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        x64 = x.double()
        count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels : 2 * channels] / n - mean * mean  # biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * n / (n - 1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


# its suggested replacement (torch.distributed._functional_collectives) is private; this one has autograd
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is deprecated", FutureWarning)

_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"GlooSync{cls.__name__}", (_GlooSyncMixin, cls), {"_original_class": cls})
    return _SYNCED[cls]


class GlooSyncBatchNorm(TorchSyncBatchNorm):
    """Synchronised batch norm on any device and backend (the class of each BN layer is swapped in place)."""

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlooSyncMixin):
                if isinstance(module, nn.SyncBatchNorm):
                    raise TypeError("GlooSyncBatchNorm: the model already holds torch.nn.SyncBatchNorm layers.")
                module.__class__ = _synced_class(type(module))
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, _GlooSyncMixin):
                module.__class__ = module._original_class
        return model

"""Feature-kernel evaluation of π-nets: kernel ridge regression on last-layer features (spec §1.8).

Official ``experiments/cifar10/cifar10test.py`` (``--test-kernel``) and ``experiments/imagenet/transfer_imagenet.py``:

- infinite net: features = normalised last hidden preactivation coefficients ``gbar_L`` and kernel
  ``K = 1/2 J1(gbar gbar^T)`` (the ReLU feature covariance of the infinite layer);
- finite net: the Gram matrix of the penultimate post-ReLU activations;
- ridge: ``alpha = (K_train + reg I)^-1 Y`` (``torch.linalg.solve``) with one-hot labels minus 0.5,
  prediction ``argmax K_test,train alpha``.

The transfer protocol trains on 250 random ImageNet 32x32 classes and evaluates the kernel on CIFAR-10
(50k train / 10k test; a 50k x 50k fp32 kernel is 10 GB: ``max_train`` subsamples on small machines),
choosing epoch and reg by CIFAR-10 kernel accuracy as the paper does.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from manynets.layers.pi_math import j1
from manynets.layers.pi_mlp import InfMLP


def pi_kernel(gbar_a: torch.Tensor, gbar_b: torch.Tensor) -> torch.Tensor:
    """``1/2 J1(gbar_a gbar_b^T)`` for unit rows (infinite-net feature kernel)."""
    return 0.5 * j1(gbar_a @ gbar_b.T)


def kernel_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features of one batch: ``gbar_L`` (unit rows) for an InfMLP, post-ReLU activations for a finite net."""
    feats = model.features(images)
    if isinstance(model, InfMLP):
        return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return feats


def gram(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The feature kernel between feature matrices a (N x f) and b (M x f) of ``model``."""
    return pi_kernel(a, b) if isinstance(model, InfMLP) else a @ b.T


def ridge_predict(k_train: torch.Tensor, labels: torch.Tensor, k_test_train: torch.Tensor, reg: float,
                  num_classes: int) -> torch.Tensor:  # fmt: skip
    """Predicted classes of kernel ridge regression on one-hot minus 0.5 targets (spec §1.8)."""
    if reg < 0:
        raise ValueError(f"kernel ridge reg={reg}; expected >= 0.")
    y = torch.nn.functional.one_hot(labels, num_classes).to(k_train.dtype) - 0.5
    eye = torch.eye(k_train.shape[0], dtype=k_train.dtype, device=k_train.device)
    alpha = torch.linalg.solve(k_train + reg * eye, y)
    return (k_test_train @ alpha).argmax(1)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) over ``(images, labels)`` batches, at most ``max_samples`` rows."""
    feats, labels, n = [], [], 0
    device = next(model.parameters()).device
    for images, y in batches:
        feats.append(kernel_features(model, images.to(device)).float())
        labels.append(y.to(device))
        n += len(y)
        if max_samples is not None and n >= max_samples:
            break
    f, y = torch.cat(feats), torch.cat(labels)
    return (f[:max_samples], y[:max_samples]) if max_samples is not None else (f, y)


@torch.no_grad()
def feature_kernel_accuracy(model: nn.Module, train_batches: Iterable, test_batches: Iterable, num_classes: int,
                            regs: Sequence[float] = (1e-4,), max_train: int | None = None) -> dict[float, float]:  # fmt: skip
    """{reg: test accuracy} of kernel ridge regression on ``model``'s last-layer feature kernel."""
    was_training = model.training
    model.eval()
    try:
        f_train, y_train = collect(model, train_batches, max_train)
        f_test, y_test = collect(model, test_batches)
    finally:
        model.train(was_training)
    k_train, k_test = gram(model, f_train, f_train), gram(model, f_test, f_train)
    return {
        reg: (ridge_predict(k_train, y_train, k_test, reg, num_classes) == y_test).float().mean().item()
        for reg in regs
    }

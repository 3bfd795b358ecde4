"""Feature-kernel evaluation of π-nets: kernel ridge regression on last-layer features (spec §1.8).

Official ``experiments/cifar10/cifar10test.py`` (``--test-kernel``) and ``experiments/imagenet/transfer_imagenet.py``:

- infinite net: features = normalised last hidden preactivation coefficients ``gbar_L`` and kernel
  ``K = 1/2 J1(gbar gbar^T)`` (the ReLU feature covariance of the infinite layer, :func:`pi_kernel`);
- finite net: the Gram matrix of the penultimate post-ReLU activations;
- ridge: ``alpha = (K_train + reg I)^-1 Y`` (``torch.linalg.solve``) with one-hot labels minus 0.5,
  prediction ``argmax K_test,train alpha``.

The features come from :meth:`manynets.networks.PiMLP.kernel_features`; the passes over the data and the
transfer protocol live in :class:`manynets.callbacks.FeatureKernelTransfer`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from manynets.layers.pi_math import j1


def pi_kernel(gbar_a: torch.Tensor, gbar_b: torch.Tensor) -> torch.Tensor:
    """``1/2 J1(gbar_a gbar_b^T)`` for unit rows (infinite-net feature kernel)."""
    return 0.5 * j1(gbar_a @ gbar_b.T)


def feature_kernel(a: torch.Tensor, b: torch.Tensor, infinite: bool) -> torch.Tensor:
    """The kernel between feature matrices a (N x f) and b (M x f): :func:`pi_kernel` or ``a b^T``."""
    return pi_kernel(a, b) if infinite else a @ b.T


def ridge_predict(k_train: torch.Tensor, labels: torch.Tensor, k_test_train: torch.Tensor, reg: float,
                  num_classes: int) -> torch.Tensor:  # fmt: skip
    """Predicted classes of kernel ridge regression on one-hot minus 0.5 targets (spec §1.8)."""
    if reg < 0:
        raise ValueError(f"kernel ridge reg={reg}; expected >= 0.")
    y = torch.nn.functional.one_hot(labels, num_classes).to(k_train.dtype) - 0.5
    eye = torch.eye(k_train.shape[0], dtype=k_train.dtype, device=k_train.device)
    alpha = torch.linalg.solve(k_train + reg * eye, y)
    return (k_test_train @ alpha).argmax(1)


def kernel_ridge_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                          num_classes: int, regs: Sequence[float], infinite: bool) -> dict[float, float]:  # fmt: skip
    """{reg: test accuracy} of kernel ridge regression on the feature kernel of the given features."""
    k_train, k_test = feature_kernel(f_train, f_train, infinite), feature_kernel(f_test, f_train, infinite)
    return {
        reg: (ridge_predict(k_train, y_train, k_test, reg, num_classes) == y_test).float().mean().item()
        for reg in regs
    }

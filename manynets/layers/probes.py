"""Linear probes on layer outputs (spec pinet_saturation §2.7 ``extract``/``probes``; PHD-LAB
``extract_latent_representations.py`` and ``probe_training.py``; Alain & Bengio 2016, "Understanding
intermediate layers using linear classifier probes").

Features of a layer: a conv map (B, C, H, W) is adaptively average-pooled to d x d and flattened to
C*d*d (PHD-LAB's ``--downsample d``, default 4), or, ``pixelwise``, each of the H*W positions gives
its own C-dimensional data set (one probe per position); a linear output is used as is.

A probe is multinomial logistic regression with an L2 penalty. :class:`LinearProbe` minimises
scikit-learn's objective divided by N, ``mean CE + ||W||^2 / (2 C N)`` (bias not penalised), on
features standardised with running statistics (a BatchNorm without affine parameters and a cumulative
average, i.e. scikit-learn's ``StandardScaler``): at evaluation it is one affine map, hence a linear
probe. :func:`sklearn_probe_accuracies` is the reference: ``StandardScaler`` + ``LogisticRegression``
on extracted features (PHD-LAB uses ``solver='saga'`` with ``max_iter=100`` on unscaled features).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric


def probe_features(output: torch.Tensor, pool_size: int | None = 4, pixelwise: bool = False) -> torch.Tensor:
    """(B, P, F) features of one layer output: P = 1 probe (pooled/linear) or P = H*W (pixelwise)."""
    if output.dim() == 4:
        if pixelwise:
            return output.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if pool_size:
            output = F.adaptive_avg_pool2d(output, pool_size)
        return output.flatten(1)[:, None]
    if output.dim() != 2:
        raise ValueError(f"layer output of shape {tuple(output.shape)}; expected (B, D) or (B, C, H, W)")
    return output[:, None]


class LinearProbe(nn.Module):
    """``num_probes`` independent multinomial logistic regressions on ``num_features`` standardised features."""

    def __init__(self, num_probes: int, num_features: int, num_classes: int, standardize: bool = True) -> None:
        super().__init__()
        self.num_probes, self.num_features = num_probes, num_features
        self.scaler = (
            nn.BatchNorm1d(num_probes * num_features, affine=False, momentum=None) if standardize else nn.Identity()
        )
        self.weight = nn.Parameter(torch.zeros(num_probes, num_features, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_probes, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, F) -> logits (B, P, K)."""
        b = features.shape[0]
        x = self.scaler(features.float().reshape(b, -1)).view(b, self.num_probes, self.num_features)
        return torch.einsum("bpf,pfk->bpk", x, self.weight) + self.bias

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, l2: float) -> torch.Tensor:
        """Sum over probes of mean cross-entropy + ``l2 / 2 * ||W_p||^2`` (``l2 = 1 / (C N)``)."""
        p = logits.shape[1]
        ce = F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, p), reduction="none")
        return ce.mean(0).sum() + 0.5 * l2 * self.weight.square().sum()


class ProbeAccuracy(Metric):
    """Accuracy of each of P probes: (B, P, K) logits against (B,) labels; ``compute() -> (P,)``."""

    full_state_update = False

    def __init__(self, num_probes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(num_probes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (logits.argmax(-1) == labels[:, None]).sum(0).double()
        self.total += labels.shape[0]

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp_min(1)


class FeatureHooks:
    """Forward hooks that store the outputs of named modules of one forward pass in ``self.outputs``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output.detach()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def extract_features(
    network: nn.Module,
    modules: dict[str, nn.Module],
    loader: Iterable,
    pool_size: int | None = 4,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features (N, F) of every named module and the labels, over ``loader`` (eval mode, in memory)."""
    hooks = FeatureHooks(modules)
    feats: dict[str, list[np.ndarray]] = {n: [] for n in modules}
    labels = []
    was_training = network.training
    network.eval()
    try:
        for images, y in loader:
            network(images.to(device))
            for name in modules:
                feats[name].append(probe_features(hooks.outputs[name], pool_size)[:, 0].float().cpu().numpy())
            labels.append(y.numpy())
    finally:
        hooks.remove()
        network.train(was_training)
    return {n: np.concatenate(v) for n, v in feats.items()}, np.concatenate(labels)


def sklearn_probe_accuracies(
    train: tuple[dict[str, np.ndarray], np.ndarray],
    evals: dict[str, tuple[dict[str, np.ndarray], np.ndarray]],
    C: float = 1.0,
    solver: str = "lbfgs",
    max_iter: int = 1000,
    standardize: bool = True,
) -> dict[str, dict[str, float]]:
    """Reference probes: per layer ``StandardScaler`` + ``LogisticRegression`` (multinomial, L2, ``C``).

    Returns ``{layer: {"train_acc": ..., "<split>_acc": ...}}`` for every split of ``evals``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, y = train
    results = {}
    for name, x in feats.items():
        steps = [StandardScaler()] if standardize else []
        model = make_pipeline(*steps, LogisticRegression(C=C, solver=solver, max_iter=max_iter))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        row = {"train_acc": float(model.score(x, y))}
        for split, (efeats, ey) in evals.items():
            row[f"{split}_acc"] = float(model.score(efeats[name], ey))
        results[name] = row
    return results

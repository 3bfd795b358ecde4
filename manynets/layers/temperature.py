"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar T divides the (ensemble) logits; it is fitted by LBFGS on the negative log-likelihood.
MixMo's official ``--tempscale`` (spec §2.4) fits T on one half of the *test* set and evaluates on
the other half, then the reverse (:func:`cross_fit_temperature`); manynets fits on the validation
split by default (:func:`fit_temperature`), so the test set is never used for fitting.

Differences from the official fit, which tries LBFGS learning rates {1e-3 ... 5e-6} with 5000
iterations and keeps the best: here LBFGS with a strong-Wolfe line search optimises log T (so T
stays positive) and converges in a few dozen iterations to the same minimiser; as in the official
code, T = 1 is kept when the fit does not lower the NLL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising ``mean NLL(softmax(logits / T), labels)``; logits (N, C), labels (N,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"fit_temperature needs logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    # Usable under Lightning's inference mode (evaluation loops): fit on normal tensors.
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits.detach().double().clone()
        labels = labels.detach().clone()
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = float(log_t.detach().exp())
        with torch.no_grad():
            fitted = F.cross_entropy(logits / temperature, labels)
            plain = F.cross_entropy(logits, labels)
    if not torch.isfinite(fitted) or fitted > plain:
        return 1.0
    return temperature


def cross_fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, seed: int = 31
) -> list[tuple[torch.Tensor, float]]:
    """The official cross-fit (spec §2.4): split 50/50 with ``seed``; fit on one half, apply to the other.

    Returns ``[(indices_of_half_B, T_fitted_on_A), (indices_of_half_A, T_fitted_on_B)]``; the caller
    evaluates each half with the other half's T and averages the metrics (the official ``final/*``).
    """
    n = logits.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    half_a, half_b = perm[: n // 2], perm[n // 2 :]
    t_a = fit_temperature(logits[half_a], labels[half_a])
    t_b = fit_temperature(logits[half_b], labels[half_b])
    return [(half_b, t_a), (half_a, t_b)]

"""ISONet isometry penalty R_iso of convolutions (Qi et al., ICML 2020; MIMOConv spec §1.3).

For a conv weight W (Co, Ci, k, k) with stride s, transposed to (Ci, Co, k, k) when Ci < Co
(so the penalty asks the wider side to be orthogonal), the Gram ``G = conv2d(W, W, padding=k-1,
stride=s)`` has shape (Co', Co', m, m); an isometry has G = I at the spatial centre
``(m // 2, m // 2)`` and 0 elsewhere. ``R_iso = 1/2 sum (G - I_centre)^2``, summed over the convs
(the official ``isometry_regularization``; MIMOConv applies it to every block and shortcut conv,
not to the stem, binding or unbinding: :func:`manynets.networks.isometry_convs`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_isometry_penalty(weight: Tensor, stride: int | tuple[int, int] = 1) -> Tensor:
    """1/2 ||conv2d(W, W, padding=k-1, stride) - I_centre||^2 of one conv weight (Co, Ci, kh, kw)."""
    if weight.dim() != 4:
        raise ValueError(f"conv_isometry_penalty expects a Conv2d weight (Co, Ci, kh, kw), got {tuple(weight.shape)}.")
    if weight.shape[1] < weight.shape[0]:
        weight = weight.transpose(0, 1)
    kh, kw = weight.shape[-2:]
    gram = F.conv2d(weight, weight, padding=(kh - 1, kw - 1), stride=stride)
    target = torch.zeros_like(gram)
    target[:, :, gram.shape[2] // 2, gram.shape[3] // 2] = torch.eye(weight.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * ((gram - target) ** 2).sum()


def isometry_regularization(convs: Iterable[nn.Conv2d]) -> Tensor:
    """R_iso: the sum of :func:`conv_isometry_penalty` over ``convs`` (each with its own stride)."""
    total: Tensor | None = None
    for conv in convs:
        term = conv_isometry_penalty(conv.weight, conv.stride)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
